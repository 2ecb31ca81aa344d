"""How much of a Jacobi / AR ratio is the machine, and what does drafting cost where it
never pays?

    python benchmarks/noise_floor.py [--turns 6] [--out DIR]

Two measurements on the bundled teacher, held-out arithmetic prompts (96 new tokens,
greedy), in-process engines built as the other benchmarks build them
(:func:`cllm_vllm.evaluation.spec_engine`), each warmed up first:

* ``spread``: AR against an identical AR engine at c = 1 (24 prompts) and c = 32 (96
  prompts), timed two ways in every turn: run by run (one engine's whole run after a few
  untimed requests, then the other's; the order alternating per turn) and group by group
  (the engines take turns per group of ``c`` prompts, the order rotated per group and
  turn: ``benchmarks/concurrency.py``'s protocol and code). Both engines are the same, so every
  departure of their ratio from 1 is the machine.
* ``floor``: at c = 32 (96 prompts), group by group: AR, Jacobi whose drafter never
  drafts (``num_speculative_tokens_per_batch_size`` ``[(1, 1024, 0)]``: vLLM's
  speculative path, this package's hooks and its policy, which rests, but no guess is ever
  sent), and the default adaptive Jacobi. On arithmetic the teacher's guesses do not pay,
  so this is what the adaptive policy costs where it should not draft.

Prints per-turn ratios and a summary (median, range, standard deviation) and writes
``noise_floor.json`` to ``--out`` (default ``benchmarks/results/noise_floor/``). About 3
minutes on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import run_groups, run_interleaved  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "noise_floor"
MAX_TOKENS = 96
WARMUP = 8
SPREAD = ((1, 24), (32, 96))  # (c, prompts)
FLOOR = (32, 96)
K = 16


def run_by_run(engines: dict, prompts, warm, c: int, turn: int) -> dict[str, float]:
    """Seconds per engine: each runs all of ``prompts`` (``c`` at a time) in turn, after a
    few untimed requests; the order alternates per turn."""
    names = list(engines)[::-1] if turn % 2 else list(engines)
    secs = {}
    for name in names:
        run_groups(engines[name], warm, MAX_TOKENS, len(warm))
        secs[name] = run_groups(engines[name], prompts, MAX_TOKENS, c)[1]
    return secs


def group_by_group(engines: dict, prompts, c: int, turn: int) -> dict[str, float]:
    """Seconds per engine, taking turns per group (``concurrency.py``'s protocol)."""
    names = list(engines)
    k = turn % len(names)
    order = names[k:] + names[:k]
    timed = run_interleaved({m: engines[m] for m in order}, prompts, MAX_TOKENS, c)
    return {m: secs for m, (_, secs) in timed.items()}


def summary(ratios: list[float]) -> dict:
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
            "stdev": round(statistics.stdev(ratios), 3),
            "turns": [round(r, 3) for r in ratios]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.turns < 2:
        ap.error("--turns must be >= 2 (a spread needs two turns)")

    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import BUNDLED_TEACHER, heldout_records, spec_engine
    from cllm_vllm.training.data import encode_prompt

    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_TEACHER))
    n_max = max(n for _, n in SPREAD + (FLOOR,))
    prompts = [encode_prompt(tok, r["messages"])
               for r in heldout_records("arithmetic", n_max + WARMUP)]
    warm, prompts = prompts[-WARMUP:], prompts[:n_max]
    jacobi = {"method": "jacobi", "num_speculative_tokens": K}
    engines = {
        "ar": spec_engine(BUNDLED_TEACHER, None),
        "ar_twin": spec_engine(BUNDLED_TEACHER, None),
        "never_drafts": spec_engine(BUNDLED_TEACHER, {
            **jacobi, "num_speculative_tokens_per_batch_size": [(1, 1024, 0)]}),
        "adaptive": spec_engine(BUNDLED_TEACHER, jacobi),
    }
    for llm in engines.values():
        run_groups(llm, warm, MAX_TOKENS, len(warm))

    result: dict = {"model": str(BUNDLED_TEACHER), "domain": "arithmetic",
                    "max_tokens": MAX_TOKENS, "k": K, "turns": args.turns,
                    "cpus": os.cpu_count(), "spread": {}, "floor": {}}
    twins = {m: engines[m] for m in ("ar", "ar_twin")}
    for c, n in SPREAD:
        runs, grouped = [], []
        for turn in range(args.turns):
            s = run_by_run(twins, prompts[:n], warm[:min(c, WARMUP)], c, turn)
            runs.append(s["ar"] / s["ar_twin"])
            s = group_by_group(twins, prompts[:n], c, turn)
            grouped.append(s["ar"] / s["ar_twin"])
            print(f"spread c={c} turn {turn}: twin/AR speed run by run {runs[-1]:.3f}, "
                  f"group by group {grouped[-1]:.3f}", flush=True)
        result["spread"][f"c={c}"] = {"prompts": n, "run_by_run": summary(runs),
                                      "group_by_group": summary(grouped)}

    c, n = FLOOR
    trio = {m: engines[m] for m in ("ar", "never_drafts", "adaptive")}
    ratios: dict[str, list[float]] = {"never_drafts": [], "adaptive": []}
    for turn in range(args.turns):
        s = group_by_group(trio, prompts[:n], c, turn)
        for m in ratios:
            ratios[m].append(s["ar"] / s[m])
        print(f"floor c={c} turn {turn}: " + ", ".join(
            f"{m} {ratios[m][-1]:.3f}x AR" for m in ratios), flush=True)
    result["floor"] = {"c": c, "prompts": n, **{m: summary(r) for m, r in ratios.items()}}
    result["total_s"] = round(time.perf_counter() - t_start, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_floor.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\nratio of speeds: median (range), standard deviation over turns")
    for key, row in result["spread"].items():
        for how in ("run_by_run", "group_by_group"):
            r = row[how]
            print(f"  AR twin / AR, {key}, {how.replace('_', ' ')}: {r['median']:.3f} "
                  f"({r['min']:.3f}-{r['max']:.3f}), sd {r['stdev']:.3f}")
    for m in ratios:
        r = result["floor"][m]
        print(f"  {m} / AR, c={c}, group by group: {r['median']:.3f} "
              f"({r['min']:.3f}-{r['max']:.3f}), sd {r['stdev']:.3f}")
    print(f"saved {out / 'noise_floor.json'} ({result['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
