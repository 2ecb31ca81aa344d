"""End to end on CPU: bundled teacher -> trajectories -> short CLLM training -> vLLM.

The trained model must decode more tokens per Jacobi step than its teacher on held-out
prompts (measured in vLLM, outputs identical to AR), while the AR loss keeps its
perplexity on held-out reference answers within 25% of the teacher's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import engine

from cllm_vllm.demo import BUNDLED_TEACHER, heldout_records
from cllm_vllm.training.recipe import TinyRecipe, perplexity

pytestmark = pytest.mark.engine

PPL_BOUND = 1.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from cllm_vllm.training import arithmetic

    root = tmp_path_factory.mktemp("e2e")
    train, _ = arithmetic.split(64, 0, seed=TinyRecipe().seed)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["question"], "answer": p["answer"]})
                               + "\n" for p in train))
    env = dict(os.environ, TQDM_DISABLE="1")
    cli = [sys.executable, "-m", "cllm_vllm.cli"]
    subprocess.run([*cli, "collect", "--teacher", str(BUNDLED_TEACHER), "--prompts",
                    str(prompts), "--out", str(root / "traj"), "--block-size", "16",
                    "--max-new-tokens", "96", "--batch-size", "32"],
                   check=True, env=env, capture_output=True)
    subprocess.run([*cli, "train", "--model", str(BUNDLED_TEACHER), "--data",
                    str(root / "traj"), "--out", str(root / "cllm"), "--steps", "80",
                    "--batch-size", "8", "--lr", "5e-4", "--ar-labels", "ground-truth",
                    "--no-progress"], check=True, env=env, capture_output=True)
    return root / "cllm"


def test_consistency_training_raises_tokens_per_step(trained):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cllm_vllm.stats import batch_acceptance
    from cllm_vllm.training.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TEACHER))
    records = heldout_records("arithmetic", 24)
    prompts = [encode_prompt(tok, r["messages"]) for r in records]
    params = SamplingParams(temperature=0, max_tokens=96)

    tps = {}
    for name, path in (("teacher", BUNDLED_TEACHER), ("trained", trained)):
        with engine(path) as ar, engine(path, 16) as jac:
            reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
            ar_out = ar.generate(reqs, params, use_tqdm=False)
            jac_out = jac.generate(reqs, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in jac_out] == \
            [o.outputs[0].token_ids for o in ar_out], name
        tps[name] = batch_acceptance(jac_out).tokens_per_step
    print(f"tokens per step: {tps}")
    assert tps["trained"] > tps["teacher"] + 0.2, tps


def test_ar_loss_keeps_perplexity_within_bound(trained):
    held = heldout_records("arithmetic", 100)
    teacher = perplexity(BUNDLED_TEACHER, held, 256)
    student = perplexity(trained, held, 256)
    print(f"held-out perplexity: teacher {teacher:.3f}, trained {student:.3f}")
    assert student <= PPL_BOUND * teacher
