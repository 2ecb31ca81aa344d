"""Which block size k? Tokens per step against step cost, AR next to Jacobi, at batch 1.

A larger block accepts more tokens per step but every step verifies ``k + 1`` tokens; on
a CPU (or a saturated GPU) that cost grows with ``k``. One run, one model, the bundled
recipe's held-out prompts. Speeds on a shared machine drift, so AR and every k take turns
``--repeats`` times: each turn's ratio is taken against the AR run of the same turn, and
the table gives the median ratio and its range over the turns.

    python benchmarks/block_size.py [--model PATH] [--ks 4 8 12 16] [--repeats 3]

Prints a table (tokens/step, tok/s, vs AR per domain) and saves JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def summarise(rows: list[dict]) -> list[dict]:
    """Per (domain, k): tokens/step, median tok/s, and the median and range of the ratio
    to the AR run of the same turn."""
    from statistics import median

    ar = {(r["turn"], r["domain"]): r["tok_s"] for r in rows if r["k"] is None}
    out = []
    for d, k in dict.fromkeys((r["domain"], r["k"]) for r in rows):
        mine = [r for r in rows if r["domain"] == d and r["k"] == k]
        ratios = [r["tok_s"] / ar[r["turn"], d] for r in mine]
        out.append({"domain": d, "k": k, "tokens_per_step": mine[0]["tokens_per_step"],
                    "tok_s": median(r["tok_s"] for r in mine), "vs_ar": median(ratios),
                    "vs_ar_min": min(ratios), "vs_ar_max": max(ratios)})
    return sorted(out, key=lambda r: (r["domain"], -1 if r["k"] is None else r["k"]))


def main(argv=None) -> int:
    from cllm_vllm.evaluation import BUNDLED_CLLM, DEMO_FILL, DOMAINS, MAX_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUNDLED_CLLM))
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12, 16])
    ap.add_argument("--fill", default=DEMO_FILL)
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts per domain")
    ap.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--repeats", type=int, default=3, help="turns of AR and every k")
    ap.add_argument("--out", default="results/block_size")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import engine, heldout_records, run_batches
    from cllm_vllm.stats import batch_acceptance
    from cllm_vllm.training.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = {d: [encode_prompt(tok, r["messages"]) for r in heldout_records(d, args.prompts)]
               for d in args.domains}
    # k None is AR. In-process engines stay alive: shutting one down breaks the next.
    engines = {k: engine(Path(args.model), k, args.fill) for k in [None, *args.ks]}
    for llm in engines.values():
        run_batches(llm, prompts[args.domains[0]][:2], 8, 1)  # warm-up
    rows = []
    for turn in range(args.repeats):
        for k, llm in engines.items():
            for d in args.domains:
                outs, t = run_batches(llm, prompts[d], MAX_TOKENS[d], 1)
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                tps = 1.0 if k is None else batch_acceptance(outs).tokens_per_step
                rows.append({"turn": turn, "k": k, "domain": d,
                             "tokens_per_step": round(tps, 3), "tok_s": round(n / t, 1)})
                print(rows[-1], flush=True)
    summary = summarise(rows)
    lines = ["| domain | k | tokens/step | tok/s batch 1 (median) | vs AR: median | range |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in summary:
        lines.append(f"| {r['domain']} | {r['k'] or 'AR'} | {r['tokens_per_step']:.2f} | "
                     f"{r['tok_s']:.0f} | {r['vs_ar']:.2f}x | "
                     f"{r['vs_ar_min']:.2f}-{r['vs_ar_max']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_size.json").write_text(json.dumps({"runs": rows, "summary": summary},
                                                    indent=1))
    (out / "block_size.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for d in args.domains:
        js = [r for r in summary if r["domain"] == d and r["k"] is not None]
        ax[0].plot([r["k"] for r in js], [r["tokens_per_step"] for r in js], "o-", label=d)
        ax[1].errorbar([r["k"] for r in js], [r["vs_ar"] for r in js], fmt="o-", capsize=3,
                       yerr=[[r["vs_ar"] - r["vs_ar_min"] for r in js],
                             [r["vs_ar_max"] - r["vs_ar"] for r in js]])
    ax[0].set(xlabel="block size k", ylabel="tokens per step")
    ax[1].set(xlabel="block size k", ylabel="Jacobi / AR tok/s, batch 1 (median, range)")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "block_size.png", dpi=120)
    print(f"saved {out / 'block_size.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
