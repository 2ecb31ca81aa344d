"""Shared fixtures: tiny random-weight models (no hub) and vLLM engines shared per module.

Engines run their core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it starts in a
few seconds instead of ~30 and lets tests read the scheduler's block pool directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_MODEL_LEN = 512
ENGINE_DEFAULTS = dict(
    dtype="float32",  # exactness tests compare argmaxes: keep float noise small
    max_model_len=MAX_MODEL_LEN,
    enforce_eager=True,
    kv_cache_memory_bytes=32 * 2**20,
    disable_log_stats=False,
    seed=0,
)


def _common_output_token(model_dir: Path, prompts: list[list[int]]) -> int:
    """A token the model emits mid-continuation for several prompts (greedy, HF)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    counts: dict[int, int] = {}
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]), max_new_tokens=40, do_sample=False, pad_token_id=0
            )[0, len(p) + 5 :].tolist()
            for t in set(out):
                counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models in two architectures: Llama with GQA, Qwen2 with GQA and tied embeddings.

    ``initializer_range=0.1`` makes the random logits peaked, so greedy continuations
    fall into loops (repetitive text) and argmax ties are rare.
    """
    from cllm_vllm.training.tiny import (
        build_looping_model,
        build_tiny_model,
        synthetic_text,
        train_tokenizer,
    )

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(synthetic_text(3000), 512, root / "tokenizer")
    paths = {"llama": root / "llama-gqa", "qwen2": root / "qwen2-tied", "loop": root / "loop"}
    build_tiny_model(paths["llama"], tok, "llama", hidden_size=128, num_heads=4,
                     num_kv_heads=2, initializer_range=0.1, seed=1)
    build_looping_model(paths["loop"], tok)
    build_tiny_model(paths["qwen2"], tok, "qwen2", hidden_size=64, num_heads=2,
                     num_kv_heads=1, tie_word_embeddings=True, initializer_range=0.1,
                     seed=2)
    # A second EOS that the Llama model really emits, so EOS handling is exercised.
    eos = _common_output_token(paths["llama"], prompt_token_ids(8, seed=7))
    gen = paths["llama"] / "generation_config.json"
    cfg = json.loads(gen.read_text())
    cfg["eos_token_id"] = [tok.eos_token_id, eos]
    gen.write_text(json.dumps(cfg))
    return paths


def prompt_token_ids(
    n: int, seed: int = 0, min_len: int = 2, max_len: int = 200
) -> list[list[int]]:
    """``n`` prompts of random tokens with lengths spread over [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=n)
    return [rng.integers(3, 500, size=int(n_tok)).tolist() for n_tok in lens]


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts made of a short random pattern repeated: continuations repeat too."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pattern = rng.integers(3, 500, size=int(rng.integers(2, 6))).tolist()
        out.append((pattern * 40)[: int(rng.integers(20, 120))])
    return out


_LIVE_ENGINES: list = []


@contextlib.contextmanager
def engine(model: Path, jacobi_k: int | None = None, **overrides):
    """A vLLM ``LLM``; Jacobi decoding with block size ``jacobi_k`` unless None (AR)."""
    from vllm import LLM

    kwargs = dict(ENGINE_DEFAULTS, **overrides)
    if jacobi_k is not None:
        spec = {"method": "jacobi", "num_speculative_tokens": jacobi_k}
        spec.update(kwargs.pop("jacobi_options", {}))
        kwargs["speculative_config"] = spec
        kwargs.setdefault("per_request_spec_decode_metrics", "summary")
    llm = LLM(str(model), **kwargs)
    # In-process engines share vLLM's process-global parallel state: shutting one down
    # tears it down for the others. They are tiny; keep them all until the session ends.
    _LIVE_ENGINES.append(llm)
    yield llm


def free_port() -> int:
    """A TCP port nothing listens on now (for servers and torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_pool(llm):
    """The scheduler's KV block pool (in-process engine core only)."""
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def generate_ids(llm, prompts, params) -> list[list[int]]:
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)  # params: one SamplingParams or one per prompt
    return [list(o.outputs[0].token_ids) for o in outs]
