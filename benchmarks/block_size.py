"""Which block size k? Tokens per step against step cost, AR next to Jacobi, at batch 1.

A larger block accepts more tokens per step but every step verifies ``k + 1`` tokens; on
a CPU (or a saturated GPU) that cost grows with ``k``. One run, one model, the bundled
recipe's held-out prompts; AR runs first and last so its spread shows the noise.

    python benchmarks/block_size.py [--model PATH] [--ks 4 8 12 16] [--fill ngram]

Prints a table (tokens/step, tok/s, vs AR per domain) and saves JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv=None) -> int:
    from cllm_vllm.demo import BUNDLED_CLLM, DEMO_FILL, DOMAINS, MAX_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUNDLED_CLLM))
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12, 16])
    ap.add_argument("--fill", default=DEMO_FILL)
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts per domain")
    ap.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--out", default="results/block_size")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from cllm_vllm.demo import _engine, _run, heldout_records
    from cllm_vllm.stats import batch_acceptance
    from cllm_vllm.training.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = {d: [encode_prompt(tok, r["messages"]) for r in heldout_records(d, args.prompts)]
               for d in args.domains}
    rows, live = [], []
    for k in [None, *args.ks, None]:
        llm = _engine(Path(args.model), k, args.fill)
        live.append(llm)  # in-process engines: shutting one down breaks the next
        _run(llm, prompts[args.domains[0]][:2], 8, 1)  # warm-up
        for d in args.domains:
            outs, t = _run(llm, prompts[d], MAX_TOKENS[d], 1)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            tps = 1.0 if k is None else batch_acceptance(outs).tokens_per_step
            rows.append({"k": k, "domain": d, "tokens_per_step": round(tps, 3),
                         "tok_s": round(n / t, 1)})
            print(rows[-1], flush=True)
    lines = ["| domain | k | tokens/step | tok/s batch 1 | vs AR (mean of both AR runs) |",
             "| --- | --- | --- | --- | --- |"]
    for d in args.domains:
        ar = [r["tok_s"] for r in rows if r["domain"] == d and r["k"] is None]
        for r in (r for r in rows if r["domain"] == d):
            lines.append(f"| {d} | {r['k'] or 'AR'} | {r['tokens_per_step']:.2f} | "
                         f"{r['tok_s']:.0f} | {r['tok_s'] / (sum(ar) / 2):.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_size.json").write_text(json.dumps(rows, indent=1))
    (out / "block_size.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for d in args.domains:
        ar = sum(r["tok_s"] for r in rows if r["domain"] == d and r["k"] is None) / 2
        js = [r for r in rows if r["domain"] == d and r["k"] is not None]
        ax[0].plot([r["k"] for r in js], [r["tokens_per_step"] for r in js], "o-", label=d)
        ax[1].plot([r["k"] for r in js], [r["tok_s"] / ar for r in js], "o-", label=d)
    ax[0].set(xlabel="block size k", ylabel="tokens per step")
    ax[1].set(xlabel="block size k", ylabel="Jacobi / AR tok/s, batch 1")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "block_size.png", dpi=120)
    print(f"saved {out / 'block_size.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
