"""A second architecture: Qwen2 with grouped-query attention (1 KV head) and tied embeddings."""

from __future__ import annotations

import json

import pytest
from conftest import engine, generate_ids, prompt_token_ids, repetitive_prompts

pytestmark = pytest.mark.engine


def test_qwen2_gqa_tied_embeddings_exact(models):
    from vllm import SamplingParams

    cfg = json.loads((models["qwen2"] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    prompts = prompt_token_ids(32, seed=11) + repetitive_prompts(8, seed=12)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with engine(models["qwen2"]) as ar:
        want = generate_ids(ar, prompts, params)
    with engine(models["qwen2"], jacobi_k=5) as llm:
        got = generate_ids(llm, prompts, params)
    assert got == want
