"""Every speculative method on the same teacher, in the same vLLM engine: AR, vLLM's n-gram,
Jacobi (teacher and CLLM), Medusa, EAGLE and EAGLE-3; offline and online.

    python benchmarks/methods.py            # the full run (`make bench`), ~40 minutes here
    python benchmarks/methods.py --quick    # smoke test: c = 1 and 8, few prompts, no sweep
    python benchmarks/methods.py --render benchmarks/results/methods/methods.json

Methods (all greedy, float32, the demo's engine settings, one engine per method):

* ``ar``: the bundled teacher, plain decoding. ``ar-cllm``: the bundled CLLM, plain (the
  reference of the CLLM's rows: its greedy output is its own, not the teacher's).
* ``ngram``: vLLM's prompt lookup on the teacher (``prompt_lookup_min`` 2, max 4).
* ``jacobi-teacher``: Jacobi on the teacher as served by default (k = 16, adaptive).
* ``jacobi-cllm-fixed``, ``jacobi-cllm``: Jacobi on the CLLM, fixed block of 16 and
  adaptive (the default).
* ``medusa``, ``eagle``, ``eagle3``: the bundled drafters (``cllm-vllm recipe tiny``, trained
  on the teacher with the CLLM's data and budget) on the teacher.

Drafts per step: Jacobi uses its documented default (16). For n-gram, Medusa, EAGLE and
EAGLE-3 a sweep in the same run picks the best k of ``SWEEP`` by output tokens/s on
``SWEEP_PROMPTS`` held-out prompts per domain at concurrency ``SWEEP_C``; the table
states the k used.

Offline: the prompts of a run are sent ``c`` at a time to ``LLM.generate`` (as
``concurrency.py``; every method gets the same batches), at c = 1, 8, 32 and 64, on the
recipe's held-out arithmetic and ShareGPT prompts. Runs are interleaved: each turn goes
through every (domain, c) and runs the methods back to back in an order rotated per turn;
a speed-up is the ratio to the same turn's AR run of the same target model, reported as
the median over turns and its range. Per run: output tokens/s, tokens per decode step
(vLLM's per-request speculative metrics, counting steps without a draft), TPOT p50/p99
and TTFT p50 (vLLM's per-request timestamps), and whether every greedy output equals the
target model's AR output. Per method: extra parameters, training minutes (from the
drafter's ``budget.json``) and the RSS its engine added to the process.

Online (not with ``--quick``): one ``vllm serve`` per method at a time, driven by ``vllm
bench serve`` at each of ``RATES`` requests/s on ``ONLINE_PROMPTS`` held-out prompts per
domain; output tokens/s, TPOT and TTFT percentiles, ratio to that turn's AR server.

Writes ``methods.json`` (every run, summaries, settings), ``table.md`` (the README's
section), ``speedup.png`` (speed-up over AR against c, one line per method, one panel per
domain) and ``tokens_per_step.png`` (bars) to benchmarks/results/methods/. Exits 1 if any
output differs from its AR reference.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from concurrency import ratio_line, speedup_axis, step_stats  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "methods"
METHODS = ("ar", "ar-cllm", "ngram", "jacobi-teacher", "jacobi-cllm-fixed", "jacobi-cllm",
           "medusa", "eagle", "eagle3")
LABELS = {"ar": "AR", "ar-cllm": "AR (CLLM)", "ngram": "n-gram", "jacobi-teacher":
          "Jacobi, teacher", "jacobi-cllm-fixed": "Jacobi, CLLM, fixed k",
          "jacobi-cllm": "Jacobi, CLLM", "medusa": "Medusa", "eagle": "EAGLE",
          "eagle3": "EAGLE-3"}
JACOBI_K = 16
SWEEP = {"ngram": (2, 4, 8), "medusa": (2, 3, 4), "eagle": (2, 3, 4, 5),
         "eagle3": (2, 3, 4, 5)}
SWEEP_PROMPTS, SWEEP_C, SWEEP_ROUNDS = 16, 8, 3
QUICK_K = {"ngram": 4, "medusa": 4, "eagle": 3, "eagle3": 3}
CONCURRENCY = (1, 8, 32, 64)
QUICK_CONCURRENCY = (1, 8)
TURNS = 3
# Prompts per run: at c = 1 the run is long (about 100 tokens per prompt at ~130 tok/s for
# AR here), so few; at high c enough for several batches' worth of requests.
PROMPTS = {1: 16, 8: 32, 32: 64, 64: 128}
RATES = (8.0, float("inf"))
ONLINE_PROMPTS = 48
ONLINE_TURNS = 2
WARMUP = 8


def target_of(method: str) -> str:
    return "CLLM" if "cllm" in method else "teacher"


def reference_of(method: str) -> str:
    return "ar-cllm" if target_of(method) == "CLLM" else "ar"


def speculative_config(method: str, k: int | None) -> dict | None:
    from cllm_vllm.evaluation import BUNDLED_DRAFTERS, drafter_spec

    if method in ("ar", "ar-cllm"):
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                "prompt_lookup_max": 4}
    if method.startswith("jacobi"):
        return {"method": "jacobi", "num_speculative_tokens": JACOBI_K,
                "adaptive": not method.endswith("fixed")}
    return drafter_spec(method, BUNDLED_DRAFTERS[method], k)


def method_costs(method: str) -> dict:
    """Parameters served beside the teacher, parameters trained and training minutes, from
    the trained model's ``budget.json`` (the CLLM replaces the teacher: nothing extra)."""
    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_DRAFTERS

    path = BUNDLED_DRAFTERS.get(method) or (BUNDLED_CLLM if "cllm" in method else None)
    if path is None:
        return {"extra_params": 0, "trained_params": 0, "train_min": 0.0}
    b = json.loads((path / "budget.json").read_text())
    return {"extra_params": 0 if path == BUNDLED_CLLM else b["trainable_parameters"],
            "trained_params": b["trainable_parameters"],
            "train_min": round(b["seconds"] / 60, 1), "train_note": b.get("note")}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def latency_stats(outs) -> dict:
    """TPOT p50/p99 and TTFT p50 (ms) from vLLM's per-request timestamps."""
    import numpy as np

    tpot, ttft = [], []
    for o in outs:
        m = o.metrics
        if m is None:
            continue
        n = len(o.outputs[0].token_ids)
        ttft.append(m.first_token_latency * 1e3)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1e3)
    pct = (lambda xs, q: round(float(np.percentile(xs, q)), 2) if xs else None)
    return {"tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "ttft_p50_ms": pct(ttft, 50)}


# -- summary, table, plots ----------------------------------------------------------------

def summarise(runs: list[dict], key=("domain", "c", "method")) -> list[dict]:
    """Per setting: medians over turns, the ratio to the same turn's AR reference (median
    and range), identical in every turn."""
    ref = {(r["turn"], *[r[k] for k in key[:-1]], r["method"]): r["tok_s"] for r in runs}
    out = []
    for setting in dict.fromkeys(tuple(r[k] for k in key) for r in runs):
        mine = [r for r in runs if tuple(r[k] for k in key) == setting]
        method = setting[-1]
        ratios = [r["tok_s"] / ref[(r["turn"], *setting[:-1], reference_of(method))]
                  for r in mine
                  if (r["turn"], *setting[:-1], reference_of(method)) in ref]
        row = dict(zip(key, setting), turns=len(mine), prompts=mine[0]["prompts"],
                   k=mine[0].get("k"))
        for f in ("tok_s", "tokens_per_step", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms"):
            vals = [r[f] for r in mine if r.get(f) is not None]
            row[f] = round(median(vals), 3) if vals else None
        row.update(vs_ar=round(median(ratios), 3) if ratios else None,
                   vs_ar_min=round(min(ratios), 3) if ratios else None,
                   vs_ar_max=round(max(ratios), 3) if ratios else None,
                   identical=(None if method in ("ar", "ar-cllm")
                              else all(r.get("identical") for r in mine)))
        out.append(row)
    return out


def _x(r: dict) -> str:
    if r["vs_ar"] is None:
        return "-"
    text = f"{r['vs_ar']:.2f}x"
    if r["turns"] > 1:
        text += f" ({r['vs_ar_min']:.2f}-{r['vs_ar_max']:.2f})"
    return text


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_tables(meta: dict, summary: list[dict], online: list[dict]) -> str:
    """The Markdown the README includes: methods and their cost, then one table per domain
    (rows: methods; columns: speed-up at each c), then the details and the online runs."""
    methods = [m for m in METHODS if m in meta["methods"]]
    costs, ks = meta["costs"], meta["k"]
    lines = ["| method | target | k | extra params served | params trained | "
             "training (min) | engine RSS (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def mparams(n):
        return f"{n / 1e6:.2f}M" if n else "0"

    notes: dict[str, list[str]] = {}
    for m in methods:
        c = costs[m]
        train = "-" if c["train_min"] is None else f"{c['train_min']:.1f}"
        if c.get("train_note"):
            train += "*"
            notes.setdefault(c["train_note"], []).append(LABELS[m])
        lines.append(f"| {LABELS[m]} | {target_of(m)} | {ks.get(m) or '-'} | "
                     f"{mparams(c['extra_params'])} | {mparams(c['trained_params'])} | "
                     f"{train} | {meta['rss_mib'][m]:.0f} |")
    for note, labels in notes.items():
        lines += ["", f"\\* {', '.join(labels)}: {note}"]
    lines += ["", "Engine RSS: what building and warming the method's engine added to the "
              "process (KV cache 256 MiB each)."]
    cs = sorted(dict.fromkeys(r["c"] for r in summary))
    for domain in dict.fromkeys(r["domain"] for r in summary):
        cell = {(r["c"], r["method"]): r for r in summary if r["domain"] == domain}
        lines += ["", f"**{domain}**: output tokens/s relative to AR of the same model "
                  "(median over turns, range), tokens per decode step at c = 1", "",
                  "| method | " + " | ".join(f"c = {c}" for c in cs)
                  + " | tokens/step | identical to AR |",
                  "| --- | " + " | ".join("---:" for _ in cs) + " | ---: | :---: |"]
        for m in methods:
            rows = [cell.get((c, m)) for c in cs]
            if not any(rows):
                continue
            tps = rows[0]["tokens_per_step"] if rows[0] else None
            ident = {None: "-", True: "yes", False: "NO"}[
                None if m in ("ar", "ar-cllm") else all(r["identical"] for r in rows if r)]
            vals = [(f"{r['tok_s']:.0f} tok/s" if m in ("ar", "ar-cllm") else _x(r))
                    if r else "-" for r in rows]
            lines.append(f"| {LABELS[m]} | " + " | ".join(vals)
                         + f" | {'-' if tps is None else f'{tps:.2f}'} | {ident} |")
    lines += ["", "Latency (ms, median over turns): TPOT p50 / p99, TTFT p50", "",
              "| domain | c | " + " | ".join(LABELS[m] for m in methods) + " |",
              "| --- | ---: | " + " | ".join("---" for _ in methods) + " |"]
    for domain in dict.fromkeys(r["domain"] for r in summary):
        for c in cs:
            cell = {r["method"]: r for r in summary if (r["domain"], r["c"]) == (domain, c)}
            lines.append(f"| {domain} | {c} | " + " | ".join(
                f"{_ms(cell[m]['tpot_p50_ms'])} / {_ms(cell[m]['tpot_p99_ms'])} / "
                f"{_ms(cell[m]['ttft_p50_ms'])}" if m in cell else "-" for m in methods) + " |")
    if online:
        rates = sorted(dict.fromkeys(r["rate"] for r in online))
        lines += ["", "Online (`vllm serve` + `vllm bench serve`): output tokens/s relative "
                  "to the AR server of the same model (median over turns, range); "
                  "TPOT p50 ms in brackets", "",
                  "| domain | method | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in rates) + " |"]
        for domain in dict.fromkeys(r["domain"] for r in online):
            for m in methods:
                cell = {r["rate"]: r for r in online
                        if (r["domain"], r["method"]) == (domain, m)}
                if not cell:
                    continue
                vals = []
                for rate in rates:
                    r = cell.get(rate)
                    if r is None:
                        vals.append("-")
                        continue
                    head = (f"{r['tok_s']:.0f} tok/s" if m in ("ar", "ar-cllm") else _x(r))
                    vals.append(f"{head} [{_ms(r['tpot_p50_ms'])}]")
                lines.append(f"| {domain} | {LABELS[m]} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(r["domain"] for r in summary))
    methods = [m for m in METHODS if m not in ("ar", "ar-cllm")
               and any(r["method"] == m for r in summary)]
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False,
                             sharey=True)
    for ax, domain in zip(axes[0], domains):
        for i, m in enumerate(methods):
            rs = sorted((r for r in summary if (r["domain"], r["method"]) == (domain, m)
                         and r["vs_ar"] is not None), key=lambda r: r["c"])
            ratio_line(ax, rs, fmt="o-" if "jacobi" in m else "s--", color=f"C{i}",
                       label=LABELS[m])
        speedup_axis(ax, sorted(dict.fromkeys(r["c"] for r in summary)), domain)
    axes[0][0].set_ylabel("output tok/s over AR of the same model\n(median, range; log)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)

    c0 = min(r["c"] for r in summary)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(domains)
    for j, domain in enumerate(domains):
        vals = [next((r["tokens_per_step"] or 1.0 for r in summary
                      if (r["domain"], r["method"], r["c"]) == (domain, m, c0)), 0.0)
                for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], vals, width, label=domain)
    ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(methods))],
                  [LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_ylabel(f"tokens per decode step (c = {c0})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tokens_per_step.png", dpi=120)
    plt.close(fig)


def write(out: Path, meta: dict, runs: list[dict], online_runs: list[dict]) -> tuple:
    summary = summarise(runs)
    online = summarise(online_runs, ("domain", "rate", "method")) if online_runs else []
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "summary": summary, "online_runs": online_runs,
         "online": online}, indent=1))
    (out / "table.md").write_text(format_tables(meta, summary, online) + "\n")
    return summary, online


# -- offline ------------------------------------------------------------------------------

def build_engines(methods, ks: dict, max_seqs: int, warm_prompts) -> tuple[dict, dict]:
    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER, run_batches, spec_engine

    paths = {"teacher": BUNDLED_TEACHER, "CLLM": BUNDLED_CLLM}
    engines, rss = {}, {}
    for m in methods:
        t0, before = time.perf_counter(), rss_mib()
        llm = spec_engine(paths[target_of(m)], speculative_config(m, ks.get(m)), max_seqs)
        warm = warm_prompts[target_of(m)]
        run_batches(llm, warm[:2], 8, 1)
        run_batches(llm, (warm * max_seqs)[:max_seqs], 8, max_seqs)
        engines[m], rss[m] = llm, round(rss_mib() - before, 1)
        print(f"[engine] {m} (k={ks.get(m)}) ready in {time.perf_counter() - t0:.0f}s, "
              f"+{rss[m]:.0f} MiB", flush=True)
    return engines, rss


def sweep(methods, prompts, quick: bool) -> tuple[dict, list[dict], dict, dict]:
    """Best k per swept method by output tokens/s; returns (k, runs, engines, rss).

    Every candidate's engine is built first; then ``SWEEP_ROUNDS`` rounds run the
    candidates back to back in a rotated order, and each is judged by its tokens over
    its time summed over the rounds (one short run per candidate was noise-bound here).
    """
    from cllm_vllm.evaluation import MAX_TOKENS, run_batches

    chosen, runs, engines, rss = {}, [], {}, {}
    for m in [m for m in methods if m in SWEEP]:
        cands = (QUICK_K[m],) if quick else SWEEP[m]
        built = {k: build_engines([m], {m: k}, max(CONCURRENCY), prompts["warm"])
                 for k in cands}
        toks, secs = dict.fromkeys(cands, 0), dict.fromkeys(cands, 0.0)
        for rnd in range(1 if quick else SWEEP_ROUNDS):
            for k in cands[rnd % len(cands):] + cands[:rnd % len(cands)]:
                for d in prompts["domains"]:
                    ps = prompts["teacher", d][:SWEEP_PROMPTS // (4 if quick else 1)]
                    outs, t = run_batches(built[k][0][m], ps, MAX_TOKENS[d], SWEEP_C)
                    toks[k] += sum(len(o.outputs[0].token_ids) for o in outs)
                    secs[k] += t
        for k in cands:
            runs.append({"method": m, "k": k, "tok_s": round(toks[k] / secs[k], 1)})
            print(f"[sweep] {m} k={k}: {toks[k] / secs[k]:.0f} tok/s", flush=True)
        chosen[m] = max(cands, key=lambda k: toks[k] / secs[k])
        engines[m], rss[m] = built[chosen[m]][0][m], built[chosen[m]][1][m]
    return chosen, runs, engines, rss


def offline(args, methods, prompts, conc, turns, n_prompts) -> tuple:
    from cllm_vllm.evaluation import MAX_TOKENS, run_batches

    t0 = time.perf_counter()
    # A first engine pays the process's one-time loads (about 500 MiB here): not a method's.
    build_engines(["ar"], {}, max(CONCURRENCY), prompts["warm"])
    ks, sweep_runs, engines, rss = sweep(methods, prompts, args.quick)
    rest = [m for m in methods if m not in engines]
    more, more_rss = build_engines(rest, ks, max(CONCURRENCY), prompts["warm"])
    engines.update(more)
    rss.update(more_rss)
    meta = {"methods": methods, "k": {m: ks.get(m, JACOBI_K if "jacobi" in m else None)
                                      for m in methods},
            "sweep": sweep_runs, "rss_mib": rss,
            "costs": {m: method_costs(m) for m in methods},
            "speculative_configs": {m: speculative_config(m, ks.get(m)) for m in methods},
            "concurrency": conc, "turns": turns, "prompts": n_prompts,
            "max_tokens": MAX_TOKENS, "quick": args.quick, "cpus": os.cpu_count(),
            "engines_s": round(time.perf_counter() - t0, 1)}
    runs = []
    for turn in range(turns):
        order = methods[turn % len(methods):] + methods[:turn % len(methods)]
        for d in prompts["domains"]:
            for c in conc:
                got = {}
                for m in order:
                    ps = prompts[target_of(m), d][: n_prompts[c]]
                    warm = prompts[target_of(m), d][-min(c, WARMUP):]
                    run_batches(engines[m], warm, MAX_TOKENS[d], len(warm))
                    outs, secs = run_batches(engines[m], ps, MAX_TOKENS[d], c)
                    got[m] = [list(o.outputs[0].token_ids) for o in outs]
                    n_tok = sum(len(x) for x in got[m])
                    row = {"turn": turn, "domain": d, "c": c, "method": m,
                           "k": meta["k"][m], "prompts": len(ps), "output_tokens": n_tok,
                           "seconds": round(secs, 3), "tok_s": round(n_tok / secs, 1),
                           "loadavg_1m": round(os.getloadavg()[0], 2), **latency_stats(outs)}
                    if m not in ("ar", "ar-cllm"):
                        row.update(step_stats(outs))
                    runs.append(row)
                for r in runs[-len(order):]:
                    ref = got.get(reference_of(r["method"]))
                    if r["method"] not in ("ar", "ar-cllm"):
                        r["identical"] = None if ref is None else got[r["method"]] == ref
                    print({k: r.get(k) for k in ("turn", "domain", "c", "method", "tok_s",
                                                 "tokens_per_step", "identical")}, flush=True)
        print(f"[turn {turn + 1}/{turns}] done at {time.perf_counter() - t0:.0f}s", flush=True)
        write(args.out, meta, runs, [])
    meta["offline_s"] = round(time.perf_counter() - t0, 1)
    return meta, runs


# -- online -------------------------------------------------------------------------------

def online(args, methods, meta) -> list[dict]:
    """One server per method at a time (all of them at once do not fit beside the offline
    engines); turns alternate the method order."""
    import serve_load

    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER

    paths = {"teacher": str(BUNDLED_TEACHER), "CLLM": str(BUNDLED_CLLM)}
    out_dir = args.out / "online"
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {(t, d): serve_load.heldout_dataset(out_dir / f"heldout_{t}_{d}.json",
                                                   paths[t], d, args.online_prompts)
                for t in paths for d in args.domains}
    runs, texts = [], {}
    for turn in range(args.online_turns):
        order = methods if turn % 2 == 0 else methods[::-1]
        for m in order:
            spec = meta["speculative_configs"][m]
            flags = [] if spec is None else ["--speculative-config", json.dumps(spec)]
            proc, url = serve_load.start_server(paths[target_of(m)], flags, 1024,
                                                out_dir / f"server_{m}.log")
            try:
                for d in args.domains:
                    bench_args = argparse.Namespace(domain=d, num_prompts=args.online_prompts,
                                                    concurrency=None)
                    warm = argparse.Namespace(domain=d, num_prompts=4, concurrency=None)
                    serve_load.bench_rate(url, paths[target_of(m)], datasets[target_of(m), d],
                                          float("inf"), warm, out_dir, f"warmup_{m}")
                    for rate in RATES:
                        name = f"{d}_rate{rate:g}_{m}_turn{turn}"
                        res = serve_load.bench_rate(url, paths[target_of(m)],
                                                    datasets[target_of(m), d], rate,
                                                    bench_args, out_dir, name,
                                                    percentiles="ttft,tpot,itl")
                        texts[turn, d, rate, m] = res.get("generated_texts")
                        row = {"turn": turn, "domain": d, "rate": rate, "method": m,
                               "k": meta["k"][m], "prompts": args.online_prompts,
                               "tok_s": res["output_throughput"],
                               "tpot_p50_ms": res.get("p50_tpot_ms"),
                               "tpot_p99_ms": res.get("p99_tpot_ms"),
                               "ttft_p50_ms": res.get("p50_ttft_ms"),
                               "failed": res.get("failed"), "result": name + ".json"}
                        runs.append(row)
                        print({k: row[k] for k in ("turn", "domain", "rate", "method",
                                                   "tok_s", "tpot_p50_ms")}, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    for r in runs:
        if r["method"] not in ("ar", "ar-cllm"):
            ref = texts.get((r["turn"], r["domain"], r["rate"], reference_of(r["method"])))
            mine = texts.get((r["turn"], r["domain"], r["rate"], r["method"]))
            r["identical"] = None if not ref or not mine else ref == mine
    return runs


# -- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    from cllm_vllm.evaluation import DOMAINS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--turns", type=int, default=None, help=f"default {TURNS}")
    ap.add_argument("--no-online", action="store_true", help="skip the vllm serve runs")
    ap.add_argument("--online-prompts", type=int, default=ONLINE_PROMPTS)
    ap.add_argument("--online-turns", type=int, default=ONLINE_TURNS)
    ap.add_argument("--quick", action="store_true",
                    help="c = 1 and 8, 4 prompts per run, 1 turn, no k sweep, no online")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {OUT} ({OUT}/quick with --quick)")
    ap.add_argument("--render", metavar="JSON", help="print the tables of a saved run")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(format_tables(saved["meta"], saved["summary"], saved["online"]))
        return 0
    methods = [m for m in METHODS if m in args.methods]
    for m in methods:
        if reference_of(m) not in methods:
            ap.error(f"{m} needs its AR reference {reference_of(m)} in --methods")
    q = args.quick
    conc = args.concurrency or list(QUICK_CONCURRENCY if q else CONCURRENCY)
    turns = args.turns or (1 if q else TURNS)
    n_prompts = {c: (4 if q else PROMPTS.get(c, max(16, 2 * c))) for c in conc}
    args.out = args.out or (OUT / "quick" if q else OUT)

    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER, heldout_records
    from cllm_vllm.training.data import encode_prompt

    t0 = time.perf_counter()
    n_max = max(n_prompts.values())
    records = {d: heldout_records(d, n_max + WARMUP) for d in args.domains}
    prompts: dict = {"domains": args.domains, "warm": {}}
    for t, path in (("teacher", BUNDLED_TEACHER), ("CLLM", BUNDLED_CLLM)):
        tok = AutoTokenizer.from_pretrained(str(path))
        for d, recs in records.items():
            prompts[t, d] = [encode_prompt(tok, r["messages"]) for r in recs]
            if len(prompts[t, d]) < n_max + WARMUP:
                ap.error(f"{d}: {len(prompts[t, d])} held-out prompts, need {n_max + WARMUP}")
        prompts["warm"][t] = prompts[t, args.domains[0]][-WARMUP:]
    meta, runs = offline(args, methods, prompts, conc, turns, n_prompts)
    plot(write(args.out, meta, runs, [])[0], args.out)  # kept if the online part fails
    online_runs = []
    if not (q or args.no_online):
        meta.update(online_prompts=args.online_prompts, online_turns=args.online_turns,
                    rates=RATES)
        online_runs = online(args, methods, meta)
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    summary, online_summary = write(args.out, meta, runs, online_runs)
    plot(summary, args.out)
    print("\n" + format_tables(meta, summary, online_summary) + "\n")
    print(f"saved {args.out}/methods.json, table.md, speedup.png, tokens_per_step.png "
          f"({meta['total_s']:.0f}s)")
    bad = [r for r in summary + online_summary if r["identical"] is False]
    failed = [r for r in online_runs if r.get("failed")]
    if bad or failed:
        print("error: " + ", ".join(
            [f"{r['method']}/{r['domain']}/{r.get('c', r.get('rate'))} differs from AR"
             for r in bad] + [f"{r['method']} had failed requests" for r in failed]),
            file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
