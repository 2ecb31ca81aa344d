"""``cllm-vllm demo``: the bundled teacher and CLLM in vLLM, AR next to Jacobi decoding.

Runs :func:`cllm_vllm.evaluation.evaluate` on the bundled models and prints one table, or
serves the bundled CLLM with ``--serve``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from .evaluation import (
    BUNDLED_CLLM,
    BUNDLED_TEACHER,
    DEMO_FILL,
    DOMAINS,
    JACOBI_ADAPTIVE,
    evaluate,
    format_table,
    heldout_records,
)
from .fill import DEFAULT_FILL, FILL_POLICIES


def serve(model: Path, port: int, k: int, fill: str) -> int:
    """``vllm serve MODEL --jacobi``: vLLM's CLI in this interpreter's environment."""
    import subprocess

    cmd = [sys.executable, "-m", "cllm_vllm.patches.vllm_cli", "serve", str(model),
           "--jacobi", "--jacobi-block-size", str(k), "--jacobi-fill", fill,
           "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--kv-cache-memory-bytes", str(256 * 2**20)]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(args) -> int:
    models = {"teacher": Path(args.teacher), "CLLM": Path(args.cllm)}
    for name, path in models.items():
        if not (path / "model.safetensors").exists():
            print(f"cllm-vllm demo: error: no {name} checkpoint at {path}; run "
                  "`cllm-vllm recipe tiny` or pass --teacher/--cllm", file=sys.stderr)
            return 2
    if args.serve:
        return serve(models["CLLM"], args.port, args.block_size, args.fill)
    rows = evaluate(models, tuple(args.domains), args.prompts, args.block_size, args.fill,
                    args.accuracy_prompts)
    table = format_table(rows)
    print("\n" + table + "\n")
    for r in rows:
        if r.model == "CLLM" and r.decoding == JACOBI_ADAPTIVE:
            q = heldout_records(r.domain, 1)[0]["messages"][-1]["content"]
            print(f"[{r.domain}] user: {q}\n[{r.domain}] CLLM (Jacobi): {r.sample.strip()}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (out / "demo.md").write_text(table + "\n")
    print(f"saved {out / 'demo.json'} and {out / 'demo.md'}")
    mismatched = [r for r in rows if r.matches_ar is False]
    if mismatched:
        print("error: Jacobi output differs from AR for "
              + ", ".join(f"{r.model}/{r.domain}" for r in mismatched), file=sys.stderr)
        return 1
    return 0


def add_args(p) -> None:
    p.add_argument("--teacher", default=str(BUNDLED_TEACHER))
    p.add_argument("--cllm", default=str(BUNDLED_CLLM))
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per domain")
    p.add_argument("--accuracy-prompts", type=int, default=300,
                   help="held-out arithmetic problems graded for accuracy")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--fill", default=DEMO_FILL, choices=FILL_POLICIES,
                   help=f"fill policy (default: {DEMO_FILL}; the package's is {DEFAULT_FILL})")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--serve", action="store_true",
                   help="start `vllm serve --jacobi` on the bundled CLLM instead")
    p.add_argument("--port", type=int, default=8000)
