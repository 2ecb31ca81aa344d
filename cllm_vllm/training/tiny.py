"""Small HF-format models and tokenizers built from a config, with no hub.

Tests build random-weight models of a few architectures vLLM serves; the bundled
recipe trains its teacher from the same builders.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
_WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish tree "
    "house car road city river sun moon star red blue green big small fast slow "
    "runs jumps sees eats has makes takes gives buys sells adds plus minus times "
    "equals is are was were and or but so then if when what how many much more less"
).split()


def synthetic_text(n_lines: int, seed: int = 0) -> list[str]:
    """Word salad with digits: enough to train a tokenizer for tests."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!"]))
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    individual_digits: bool = False):
    """Train a byte-level BPE tokenizer and save it in HF format; returns the HF tokenizer.

    ``individual_digits`` splits numbers into single digits (one token each), which small
    models need to learn arithmetic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


ARCHITECTURES = ("llama", "qwen2")


def build_tiny_model(
    out_dir: str | Path,
    tokenizer=None,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: str = "float32",
):
    """Save a randomly initialised causal LM (HF format, safetensors) and return it.

    ``head_dim = hidden_size / num_heads`` should be at least 32: vLLM's CPU attention
    rejects 16.
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_tokenizer(synthetic_text(2000, seed), 512, out_dir)
    elif not (out_dir / "tokenizer.json").exists():
        tokenizer.save_pretrained(str(out_dir))
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    model = cls(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )
    return model


def build_looping_model(out_dir: str | Path, tokenizer=None, seed: int = 1):
    """A tiny Llama whose greedy continuation falls into short cycles.

    Scaling the embeddings by 100 makes them dominate the residual stream, so the next
    token is nearly a function of the current one and greedy decoding soon repeats: the
    model tests and benchmarks use to show drafts being proposed and accepted.
    """
    import torch

    model = build_tiny_model(out_dir, tokenizer, "llama", hidden_size=128, num_heads=4,
                             num_kv_heads=2, initializer_range=0.1, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(100.0)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model
