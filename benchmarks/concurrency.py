"""Is Jacobi decoding ever slower than AR? Output tokens/s at concurrency 1 to 64.

For each bundled model (the CLLM and its teacher), each domain of the bundled recipe's
held-out prompts (arithmetic, ShareGPT; encoded and given ``MAX_TOKENS`` new tokens as in
the demo) and each concurrency ``c``, it measures output tokens/s of AR decoding, Jacobi
with a fixed block (``"adaptive": False``) and Jacobi with the adaptive per-request draft
length (the package's default), k = 16, the package's default fill, greedy, float32.
``--methods`` may add ``fixed-N``, a fixed block of ``N`` guesses (``fixed`` is ``k``).

    python benchmarks/concurrency.py [--concurrency 1 4 16 32 64] [--turns 5]
        [--methods ar fixed adaptive fixed-N] [--models CLLM teacher] [--domains ...]
        [--prompts-per-c 3] [--min-prompts 64] [--out DIR]
    python benchmarks/concurrency.py --quick     # smoke test: c = 1 and 8, 1 turn, to quick/
    python benchmarks/concurrency.py --render DIR/concurrency.json   # the table again

The full default run takes about 25 minutes on the project's 2-core machine (see
``TURNS`` below); ``--quick`` about 1.5 minutes.

How load is applied: the prompts of a run are submitted ``c`` at a time, one
``LLM.generate`` call per group of ``c`` (as the demo's batch 32). Then one engine per
(model, method) serves every concurrency: six engines, built once, up front, and kept
alive to the end (in-process engines share vLLM's process-global state and cannot be
shut down safely), and every method gets exactly the same batches. The alternative, all
prompts at once into an engine with ``max_num_seqs = c``, keeps ``c`` requests running
until the queue drains but needs an engine per (model, method, c): 30 engines. The price
of groups: each group drains at its end (its last requests run beside fewer than ``c``
others), for every method alike; output tokens/s includes that tail, as a client that sends
``c`` requests and waits for all of them would see.

A run at concurrency ``c`` takes the first ``max(3c, 64)`` held-out prompts of its domain
(``--prompts-per-c``, ``--min-prompts``): the same 64 for c = 1, 4 and 16, then 96 and
192; before it, its engine serves ``min(c, 8)`` of the last held-out prompts untimed
(``WARMUP``). Speeds on a shared machine drift, so the runs are interleaved: each turn goes through
every setting (model, domain, c), and within a setting the methods take turns group by
group (each group of ``c`` prompts is sent to every method before the next group, in an
order rotated per group and per turn), so that a slow spell of the machine falls on all
of them alike; a ratio is taken against the AR run of the same turn and setting, and the
summary gives its median and range over the turns. Taking turns by group keeps the
spread of an AR engine against an identical one steady whatever else the machine runs
(``benchmarks/noise_floor.py``, two runs of 6 turns: standard deviation of the per-turn
ratio 0.013-0.014 at c = 1 and 0.043-0.046 at c = 32, against 0.033-0.090 and 0.026-0.126
taking turns by run). Each setting also records the 1-minute load average before it
(``loadavg_1m``): on 2 cores, any other process slows a run several-fold.

Per Jacobi run it records, from vLLM's per-request speculative metrics
(``cllm_vllm.stats``), tokens and drafted tokens per decode step, counting the steps
that carried no draft (vLLM records only those that did: a fixed block drafts at every
decode step, adaptive drafting may send none; see :func:`step_stats` for how the decode
steps are counted), the share of decode steps that carried a draft, and per drafted step
vLLM's mean acceptance length (1 + accepted / steps) and draft length. Finally, whether
every output is token-identical to the AR output of the same prompts in the same turn; the
script exits 1 if one is not.

Writes ``concurrency.json`` (every run, the summary and the settings; rewritten after each
turn), ``table.md`` (:func:`format_table`, for the README verbatim) and ``concurrency.png``
(speed-up over AR against c, one panel per domain) to benchmarks/results/concurrency/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

OUT = Path(__file__).resolve().parent / "results" / "concurrency"
METHODS = ("ar", "fixed", "adaptive")
CONCURRENCY = (1, 4, 16, 32, 64)
QUICK_CONCURRENCY = (1, 8)
K = 16
# Prompts per run max(PER_C * c, MIN_PROMPTS): 64, 64, 64, 96, 192 for c = 1, 4, 16, 32, 64
# (the recipe holds out 200 ShareGPT prompts). Sized on this 2-core machine, idle: one turn
# of AR + fixed on the teacher with max(2c, 16) prompts ran in 37 s (c = 1: AR 400 tok/s,
# fixed 350-630; c = 64: AR 3,700-4,100, fixed 1,200-2,300); with these counts a turn of
# all three methods on both models comes to about 4.5 minutes, five turns plus start-up
# to about 25 minutes. Another process on the machine stretches that.
TURNS = 5
PER_C = 3
MIN_PROMPTS = 64
WARMUP = 8
"""Before each timed run its engine serves ``min(c, WARMUP)`` other held-out prompts,
untimed: the first steps after another engine ran pay for cold caches (up to 20% of a
1-second run here), which would penalise whichever method goes first in a turn."""


def num_prompts(c: int, per_c: int, minimum: int) -> int:
    """Prompts per run at concurrency ``c``: ``max(per_c * c, minimum)``."""
    return max(per_c * c, minimum)


# -- engines ------------------------------------------------------------------------------

def fixed_size(method: str) -> int | None:
    """``N`` for a method ``fixed-N`` (a fixed block of ``N`` guesses instead of ``--k``:
    what a short block would give where the adaptive policy drafts little), else None."""
    size = method.removeprefix("fixed-")
    return int(size) if size != method and size.isdigit() and int(size) >= 1 else None


def method_name(text: str) -> str:
    """A ``--methods`` entry: one of ``METHODS``, or ``fixed-N``."""
    if text in METHODS or fixed_size(text) is not None:
        return text
    raise argparse.ArgumentTypeError(
        f"unknown method {text!r}: choose from {', '.join(METHODS)} or fixed-N (N >= 1)")


def speculative_configs(methods, k: int = K) -> dict[str, dict | None]:
    """The ``speculative_config`` of each method (None: AR); the package's default fill."""
    base = {"method": "jacobi", "num_speculative_tokens": k}
    modes = {"ar": None, "fixed": {**base, "adaptive": False},
             "adaptive": {**base, "adaptive": True}}
    modes.update({m: {**base, "num_speculative_tokens": n, "adaptive": False}
                  for m in methods if (n := fixed_size(m)) is not None})
    return {m: modes[m] for m in methods}


def make_engine(model: Path, spec: dict | None, max_num_seqs: int):
    """The demo's engine settings (``cllm_vllm.evaluation.spec_engine``)."""
    from cllm_vllm.evaluation import spec_engine

    return spec_engine(model, spec, max_num_seqs)


def run_groups(llm, prompts, max_tokens: int, c: int):
    """Greedy outputs of ``prompts`` sent ``c`` at a time, and the wall time (the demo's)."""
    from cllm_vllm.evaluation import run_batches

    return run_batches(llm, prompts, max_tokens, c)


def run_interleaved(llms: dict, prompts, max_tokens: int, c: int) -> dict:
    """Every method's outputs of ``prompts`` sent ``c`` at a time, and its wall time: the
    methods take turns group by group, in the given order rotated per group."""
    methods = list(llms)
    outs = {m: [] for m in methods}
    secs = dict.fromkeys(methods, 0.0)
    for g, i in enumerate(range(0, len(prompts), c)):
        for m in methods[g % len(methods):] + methods[:g % len(methods)]:
            o, s = run_groups(llms[m], prompts[i: i + c], max_tokens, c)
            outs[m] += o
            secs[m] += s
    return {m: (outs[m], secs[m]) for m in methods}


def step_stats(outs) -> dict:
    """Step counts of a Jacobi run, from vLLM's per-request speculative metrics.

    vLLM records a step for a request only when it carried a draft (``Acceptance.steps``);
    a fixed block drafts at every decode step, adaptive drafting may send none. Every decode
    step gains 1 + its accepted guesses, and a request's first token comes from its
    prefill, so its decode steps are ``max(drafted steps, tokens - 1 - accepted)`` (a last
    step whose guesses ran past EOS or ``max_tokens`` counts them as accepted; where it had
    a draft this can under-count by that step's excess; exact for a fixed block).
    """
    from cllm_vllm.stats import request_acceptance

    drafted_steps = accepted = drafted = decode_steps = gained = 0
    for o in outs:
        a = request_acceptance(o)
        n = len(o.outputs[0].token_ids)
        drafted_steps += a.steps
        accepted += a.accepted
        drafted += a.drafted
        decode_steps += max(a.steps, n - 1 - a.accepted)
        gained += max(n - 1, 0)

    def ratio(x, y, empty):
        return round(x / y, 3) if y else empty

    return {
        "drafted_steps": drafted_steps, "accepted": accepted, "drafted": drafted,
        "decode_steps": decode_steps,
        # Per decode step, drafted or not (the table's columns).
        "tokens_per_step": ratio(gained, decode_steps, 1.0),
        "drafted_per_step": ratio(drafted, decode_steps, 0.0),
        "draft_step_share": ratio(drafted_steps, decode_steps, 0.0),
        # Per step that carried a draft: vLLM's mean acceptance length (1 + accepted /
        # steps, ``Acceptance.tokens_per_step`` before adaptive drafting) and draft length.
        "acceptance_length": ratio(drafted_steps + accepted, drafted_steps, 1.0),
        "drafted_per_drafted_step": ratio(drafted, drafted_steps, 0.0),
    }


# -- summary, table, plot -----------------------------------------------------------------

def summarise(runs: list[dict]) -> list[dict]:
    """Per (model, domain, c, method): median tok/s; the median, min and max over turns of
    the ratio to the same turn's AR run; median step statistics; identical in every turn."""
    ar = {(r["turn"], r["model"], r["domain"], r["c"]): r["tok_s"]
          for r in runs if r["method"] == "ar"}
    out = []
    keys = dict.fromkeys((r["model"], r["domain"], r["c"], r["method"]) for r in runs)
    for model, domain, c, method in keys:
        mine = [r for r in runs if (r["model"], r["domain"], r["c"], r["method"])
                == (model, domain, c, method)]
        ratios = [r["tok_s"] / ar[r["turn"], model, domain, c] for r in mine
                  if (r["turn"], model, domain, c) in ar]
        row = {"model": model, "domain": domain, "c": c, "method": method,
               "turns": len(mine), "prompts": mine[0]["prompts"],
               "tok_s": round(median(r["tok_s"] for r in mine), 1),
               "tok_s_min": min(r["tok_s"] for r in mine),
               "tok_s_max": max(r["tok_s"] for r in mine),
               "vs_ar": round(median(ratios), 3) if ratios else None,
               "vs_ar_min": round(min(ratios), 3) if ratios else None,
               "vs_ar_max": round(max(ratios), 3) if ratios else None,
               "identical": (None if method == "ar"
                             else all(r["identical"] for r in mine))}
        for f in ("tokens_per_step", "drafted_per_step", "draft_step_share",
                  "acceptance_length", "drafted_per_drafted_step"):
            if method != "ar":
                row[f] = round(median(r[f] for r in mine), 3)
        out.append(row)
    return out


def _order(summary):
    models = list(dict.fromkeys(r["model"] for r in summary))
    domains = list(dict.fromkeys(r["domain"] for r in summary))
    return models, domains


def _ratio(r: dict) -> str:
    """``1.85x (1.55-2.16)``: median over turns (bold when below 1), then the range."""
    if r["vs_ar"] is None:
        return "-"
    text = f"{r['vs_ar']:.2f}x"
    if r["vs_ar"] < 1:
        text = f"**{text}**"
    if r["turns"] > 1:
        text += f" ({r['vs_ar_min']:.2f}-{r['vs_ar_max']:.2f})"
    return text


NOTE = ("Ratios are Jacobi / AR output tokens/s of the same turn: the median over turns "
        "(bold when below 1.00x) and the range. Tokens/step and drafted/step are per "
        "decode step, counting those that carried no draft (AR: 1 token, 0 drafted); "
        "where some steps carried none, the share that did follows in brackets.")


def format_table(summary: list[dict], note: bool = True) -> str:
    """The Markdown table of a summary (``table.md``; the README includes it verbatim).

    One row per (model, domain, c): AR tok/s; per Jacobi method its tok/s and its ratio to
    AR (median over turns, bold when below 1, range); tokens and drafted tokens per decode
    step (all decode steps; where some carried no draft, the share that did); whether
    every Jacobi output was identical to AR's. With ``note``, a paragraph saying so follows
    the table.
    """
    models, domains = _order(summary)
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    methods += [m for m in dict.fromkeys(r["method"] for r in summary) if m not in methods]
    jac = [m for m in methods if m != "ar"]
    cell = {(r["model"], r["domain"], r["c"], r["method"]): r for r in summary}
    head = ["model", "domain", "c"]
    if "ar" in methods:
        head.append("AR tok/s")
    for m in jac:
        head += [f"{m} tok/s", f"{m} vs AR: median (range)"]
    if jac:
        head += [f"tokens/step {' / '.join(jac)}", f"drafted/step {' / '.join(jac)}",
                 "identical to AR"]
    align = ["---", "---"] + ["---:"] * (len(head) - 2 - bool(jac)) + [":---:"] * bool(jac)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    cs = sorted(dict.fromkeys(r["c"] for r in summary))
    for model in models:
        for domain in domains:
            for c in cs:
                rows = {m: cell.get((model, domain, c, m)) for m in methods}
                if not any(rows.values()):
                    continue
                line = [model, domain, str(c)]
                if "ar" in methods:
                    line.append(f"{rows['ar']['tok_s']:.0f}" if rows["ar"] else "-")
                tps, dps, ident = [], [], []
                for m in jac:
                    r = rows[m]
                    if r is None:
                        line += ["-", "-"]
                        tps.append("-")
                        dps.append("-")
                        continue
                    line.append(f"{r['tok_s']:.0f}")
                    line.append(_ratio(r))
                    tps.append(f"{r['tokens_per_step']:.2f}")
                    d = f"{r['drafted_per_step']:.1f}"
                    if r["draft_step_share"] < 0.995:
                        d += f" ({100 * r['draft_step_share']:.0f}%)"
                    dps.append(d)
                    ident.append(r["identical"])
                if jac:
                    line += [" / ".join(tps), " / ".join(dps),
                             "yes" if all(ident) else "NO"]
                lines.append("| " + " | ".join(line) + " |")
    if note and jac:
        lines += ["", NOTE]
    return "\n".join(lines)


def ratio_line(ax, rows: list[dict], **style) -> None:
    """Median ratio to AR against c, its range over turns as error bars."""
    ax.errorbar([r["c"] for r in rows], [r["vs_ar"] for r in rows],
                yerr=[[r["vs_ar"] - r["vs_ar_min"] for r in rows],
                      [r["vs_ar_max"] - r["vs_ar"] for r in rows]], capsize=3, **style)


def speedup_axis(ax, cs: list[int], title: str) -> None:
    """Concurrency on a log2 x axis, ratios on a log2 y axis with a line at 1.0x: 0.5x and
    2x lie equally far from 1, and one stray turn does not flatten the rest."""
    import matplotlib.ticker

    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set(title=title, xlabel="concurrency (requests in flight)")


def plot(summary: list[dict], path: Path) -> None:
    """Speed-up over AR (median, range as error bars) against c, log2 x axis; one panel
    per domain, one line per model x Jacobi method, a dashed line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, domains = _order(summary)
    jac = [m for m in dict.fromkeys(r["method"] for r in summary) if m != "ar"]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.8), squeeze=False,
                             sharey=True)
    styles = {"fixed": "o-", "adaptive": "s--"}
    others = [m for m in jac if m not in styles]  # fixed-N: one marker each
    styles.update({m: f"{'^vDx*P'[i % 6]}:" for i, m in enumerate(others)})
    for ax, domain in zip(axes[0], domains):
        for i, model in enumerate(models):
            for m in jac:
                rs = sorted((r for r in summary if r["model"] == model and r["domain"] == domain
                             and r["method"] == m and r["vs_ar"] is not None),
                            key=lambda r: r["c"])
                if rs:
                    ratio_line(ax, rs, fmt=styles[m], color=f"C{i}",
                               label=f"{model}, {m}")
        speedup_axis(ax, sorted(dict.fromkeys(r["c"] for r in summary)), domain)
    axes[0][0].set_ylabel("Jacobi / AR output tok/s\n(median over turns, range; log)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, meta: dict, runs: list[dict]) -> list[dict]:
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrency.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "summary": summary}, indent=1))
    (out / "table.md").write_text(format_table(summary) + "\n")
    return summary


# -- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER, DOMAINS, MAX_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["CLLM", "teacher"],
                    help="CLLM, teacher, or NAME=PATH")
    ap.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--methods", nargs="+", type=method_name, default=list(METHODS),
                    help=f"{' '.join(METHODS)} (default: all) or fixed-N")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help=f"default {' '.join(map(str, CONCURRENCY))}")
    ap.add_argument("--turns", type=int, default=None, help=f"default {TURNS}")
    ap.add_argument("--prompts-per-c", type=int, default=None,
                    help=f"prompts per run = max(this x c, --min-prompts); default {PER_C}")
    ap.add_argument("--min-prompts", type=int, default=None, help=f"default {MIN_PROMPTS}")
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: concurrency 1 and 8, 1 prompt per c (min 2), 1 turn")
    ap.add_argument("--out", default=None,
                    help=f"default {OUT} ({OUT}/quick with --quick)")
    ap.add_argument("--render", metavar="JSON", help="print the table of a saved run; no runs")
    args = ap.parse_args(argv)
    if args.render:
        print(format_table(json.loads(Path(args.render).read_text())["summary"]))
        return 0
    q = args.quick
    conc = args.concurrency or list(QUICK_CONCURRENCY if q else CONCURRENCY)
    turns = args.turns or (1 if q else TURNS)
    per_c = args.prompts_per_c or (1 if q else PER_C)
    min_prompts = args.min_prompts or (2 if q else MIN_PROMPTS)
    if turns < 1 or min(conc) < 1 or per_c < 1 or min_prompts < 1:
        ap.error("--turns, --concurrency, --prompts-per-c and --min-prompts must be >= 1")
    paths = {"CLLM": BUNDLED_CLLM, "teacher": BUNDLED_TEACHER}
    models = {}
    for m in args.models:
        name, _, path = m.partition("=")
        models[name] = Path(path) if path else paths.get(name)
        if models[name] is None:
            ap.error(f"unknown model {m!r}: CLLM, teacher or NAME=PATH")

    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import heldout_records
    from cllm_vllm.training.data import encode_prompt

    t_start = time.perf_counter()
    specs = speculative_configs(args.methods, args.k)
    n_max = max(num_prompts(c, per_c, min_prompts) for c in conc)
    records = {d: heldout_records(d, n_max + WARMUP) for d in args.domains}
    prompts = {}
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(str(path))
        for d, recs in records.items():
            prompts[name, d] = [encode_prompt(tok, r["messages"]) for r in recs]
            if len(prompts[name, d]) < n_max + WARMUP:
                ap.error(f"{d}: only {len(prompts[name, d])} held-out prompts, "
                         f"need {n_max + WARMUP}")
    # All engines up front, kept alive to the end (in-process engines cannot be shut down).
    engines = {}
    for name, path in models.items():
        for m, spec in specs.items():
            t0 = time.perf_counter()
            engines[name, m] = make_engine(path, spec, max(conc))
            warm = prompts[name, args.domains[0]]
            run_groups(engines[name, m], warm[:2], 8, 1)
            run_groups(engines[name, m], (warm * max(conc))[:max(conc)], 8, max(conc))
            print(f"[engine] {name}/{m} ready in {time.perf_counter() - t0:.0f}s", flush=True)
    t_ready = time.perf_counter()
    meta = {"models": {n: str(p) for n, p in models.items()}, "domains": args.domains,
            "methods": args.methods, "concurrency": conc, "turns": turns, "k": args.k,
            "prompts_per_c": per_c, "min_prompts": min_prompts,
            "max_tokens": {d: MAX_TOKENS[d] for d in args.domains},
            "speculative_configs": specs, "quick": q, "cpus": os.cpu_count(),
            "engines_s": round(t_ready - t_start, 1)}
    out = Path(args.out or (OUT / "quick" if q else OUT))
    runs: list[dict] = []
    for turn in range(turns):
        order = args.methods[turn % len(args.methods):] + args.methods[:turn % len(args.methods)]
        for name in models:
            for d in args.domains:
                for c in conc:
                    n = num_prompts(c, per_c, min_prompts)
                    ps = prompts[name, d][:n]
                    got = {}
                    warm = prompts[name, d][-min(c, WARMUP):]
                    for m in order:
                        run_groups(engines[name, m], warm, MAX_TOKENS[d], len(warm))
                    load = round(os.getloadavg()[0], 2)
                    timed = run_interleaved({m: engines[name, m] for m in order}, ps,
                                            MAX_TOKENS[d], c)
                    for m in order:
                        outs, secs = timed[m]
                        got[m] = [list(o.outputs[0].token_ids) for o in outs]
                        n_tok = sum(len(x) for x in got[m])
                        row = {"turn": turn, "model": name, "domain": d, "c": c, "method": m,
                               # its place in the first group (rotated per group)
                               "position": order.index(m), "prompts": n,
                               "output_tokens": n_tok, "seconds": round(secs, 3),
                               "tok_s": round(n_tok / secs, 1), "loadavg_1m": load}
                        if m != "ar":
                            row.update(step_stats(outs))
                        runs.append(row)
                    for r in runs[-len(order):]:
                        if r["method"] != "ar":
                            r["identical"] = got[r["method"]] == got["ar"] if "ar" in got \
                                else None
                        print({k: v for k, v in r.items() if k not in (
                            "drafted_steps", "accepted", "drafted", "decode_steps",
                            "position", "drafted_per_drafted_step")}, flush=True)
        meta["runs_s"] = round(time.perf_counter() - t_ready, 1)
        summary = write(out, meta, runs)
        print(f"[turn {turn + 1}/{turns}] done at {time.perf_counter() - t_start:.0f}s",
              flush=True)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    summary = write(out, meta, runs)
    table = format_table(summary)
    print("\n" + table + "\n")
    plot(summary, out / "concurrency.png")
    print(f"saved {out}/concurrency.json, table.md, concurrency.png "
          f"(engines {meta['engines_s']:.0f}s, runs {meta['runs_s']:.0f}s, "
          f"total {meta['total_s']:.0f}s)")
    bad = [r for r in summary if r["identical"] is False]
    if bad:
        print("error: Jacobi output differs from AR for " + ", ".join(
            f"{r['model']}/{r['domain']}/c={r['c']}/{r['method']}" for r in bad),
            file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
