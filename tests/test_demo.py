"""`cllm-vllm demo` on the bundled models, on a small held-out prompt set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port

from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER, JACOBI_ADAPTIVE, JACOBI_FIXED

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
        (m, d, dom) for m in ("teacher", "CLLM") for d in ("AR", JACOBI_FIXED, JACOBI_ADAPTIVE)
        for dom in ("arithmetic", "sharegpt")}
    jacobi = [r for r in rows if r["decoding"] != "AR"]
    assert all(r["matches_ar"] for r in jacobi)
    fixed = [r for r in jacobi if r["decoding"] == JACOBI_FIXED]
    cllm = {r["domain"]: r for r in fixed if r["model"] == "CLLM"}
    teacher = {r["domain"]: r for r in fixed if r["model"] == "teacher"}
    # The bundled CLLM's consistency training shows: well above its teacher, which stays
    # near one token per step (the README's table: 3.15 against 1.22 on 32 prompts).
    assert cllm["arithmetic"]["tokens_per_step"] > 2.0, cllm
    assert cllm["arithmetic"]["tokens_per_step"] > teacher["arithmetic"]["tokens_per_step"] + 0.5


def test_demo_serve_answers_chat_with_jacobi(tmp_path):
    import requests

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cllm_vllm.cli", "demo", "--serve",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        body = {"model": str(BUNDLED_CLLM), "temperature": 0, "max_tokens": 48,
                "messages": [{"role": "user", "content": "Sam has 4 cards. Sam buys 3 packs "
                              "of cards. Each pack has 5 cards. How many cards now?"}]}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
        metrics = requests.get(url + "/metrics", timeout=10).text
        drafts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("vllm:spec_decode_num_drafts")]
        assert drafts and drafts[0] > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
