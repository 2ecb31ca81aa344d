"""End to end on CPU: bundled teacher -> trajectories -> short CLLM training -> vLLM.

The trained model must decode more tokens per Jacobi step than its teacher on held-out
prompts (measured in vLLM, outputs identical to AR), while the AR loss keeps the quality
of its greedy output: its perplexity on the teacher's greedy continuations of held-out
prompts stays within 25% of the teacher's own. 64 prompts for 120 steps overfit, so the
AR term weighs 30 here (10 in the recipe, on 3,500 prompts): at weight 10 the bundled
teacher's near-deterministic output (perplexity 1.02) rose to 1.36.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import engine

from cllm_vllm.evaluation import BUNDLED_TEACHER, heldout_records
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
                    str(root / "traj"), "--out", str(root / "cllm"), "--steps", "120",
                    "--batch-size", "8", "--lr", "3e-4", "--ar-labels", "ground-truth",
                    "--ar-weight", "30", "--no-progress"],
                   check=True, env=env, capture_output=True)
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
        # A fixed block: tokens per step are then the model's, not the adaptive policy's.
        with engine(path) as ar, engine(path, 16, jacobi_options={"adaptive": False}) as jac:
            reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
            ar_out = ar.generate(reqs, params, use_tqdm=False)
            jac_out = jac.generate(reqs, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in jac_out] == \
            [o.outputs[0].token_ids for o in ar_out], name
        tps[name] = batch_acceptance(jac_out).tokens_per_step
    print(f"tokens per step: {tps}")
    assert tps["trained"] > tps["teacher"] + 0.05, tps


def test_ar_loss_keeps_greedy_output_quality_within_bound(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cllm_vllm.training.data import encode_prompt

    held = heldout_records("arithmetic", 40)
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TEACHER))
    teacher = AutoModelForCausalLM.from_pretrained(str(BUNDLED_TEACHER)).eval()
    greedy = []
    for rec in held:
        p = encode_prompt(tok, rec["messages"])
        with torch.no_grad():
            out = teacher.generate(torch.tensor([p]), max_new_tokens=96, do_sample=False)
        text = tok.decode(out[0, len(p):], skip_special_tokens=True).strip()
        greedy.append({"messages": rec["messages"], "answer": text})
    ppl_teacher = perplexity(BUNDLED_TEACHER, greedy, 256)
    ppl_trained = perplexity(trained, greedy, 256)
    ref = (perplexity(BUNDLED_TEACHER, held, 256), perplexity(trained, held, 256))
    print(f"perplexity of the teacher's greedy output: teacher {ppl_teacher:.3f}, trained "
          f"{ppl_trained:.3f}; of the reference answers: {ref[0]:.3f} -> {ref[1]:.3f}")
    assert ppl_trained <= PPL_BOUND * ppl_teacher
