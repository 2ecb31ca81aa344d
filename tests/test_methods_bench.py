"""`benchmarks/methods.py --quick`: every method on the bundled teacher runs end to end in vLLM,
its outputs equal its AR reference, and the tables and plots are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent


def test_methods_quick_runs_every_method_and_writes_tables_and_plots(tmp_path):
    out = tmp_path / "methods"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "methods.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from methods import LABELS, METHODS

    got = {(r["domain"], r["c"], r["method"]) for r in saved["summary"]}
    assert got == {(d, c, m) for d in ("arithmetic", "sharegpt") for c in (1, 8)
                   for m in METHODS}
    for r in saved["summary"]:
        assert r["tok_s"] > 0
        if r["method"] not in ("ar", "ar-cllm"):
            assert r["identical"] is True, r
            assert r["vs_ar"] > 0 and r["tokens_per_step"] >= 1.0
    assert saved["meta"]["k"]["eagle"] == 3 and saved["meta"]["k"]["jacobi-cllm"] == 16
    assert saved["meta"]["costs"]["medusa"]["extra_params"] > 1e6
    table = (out / "table.md").read_text()
    for m in METHODS:
        assert f"| {LABELS[m]} |" in table
    for png in ("speedup.png", "tokens_per_step.png"):
        assert (out / png).stat().st_size > 10_000
