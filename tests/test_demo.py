"""`cllm-vllm demo` on the bundled models, on a small held-out prompt set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cllm_vllm.demo import BUNDLED_CLLM, BUNDLED_TEACHER

pytestmark = pytest.mark.engine


def test_bundled_models_are_compact_hf_checkpoints():
    total = 0
    for d in (BUNDLED_TEACHER, BUNDLED_CLLM):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            assert (d / f).exists(), d / f
        total += sum(p.stat().st_size for p in d.iterdir())
        card = (d / "README.md").read_text()
        assert "cllm-vllm recipe tiny" in card and "tokens per step" in card
    assert total <= 40 * 2**20


def test_demo_prints_the_table_and_outputs_match_ar(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "cllm_vllm.cli", "demo", "--prompts", "3",
         "--accuracy-prompts", "8", "--out", str(out)],
        env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| domain | model | decoding | tokens/step |" in proc.stdout
    rows = json.loads((out / "demo.json").read_text())
    assert {(r["model"], r["decoding"], r["domain"]) for r in rows} == {
        (m, d, dom) for m in ("teacher", "CLLM") for d in ("AR", "Jacobi")
        for dom in ("arithmetic", "sharegpt")}
    jacobi = [r for r in rows if r["decoding"] == "Jacobi"]
    assert all(r["matches_ar"] for r in jacobi)
    assert all(r["tokens_per_step"] >= 1.0 for r in jacobi)
    cllm = {r["domain"]: r for r in jacobi if r["model"] == "CLLM"}
    teacher = {r["domain"]: r for r in jacobi if r["model"] == "teacher"}
    assert cllm["arithmetic"]["tokens_per_step"] > teacher["arithmetic"]["tokens_per_step"]
