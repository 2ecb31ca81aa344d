"""What share of a Jacobi engine step does the proposer (the CPU-side drafter) cost?

    python benchmarks/proposer_cost.py --label before [--settings 1k short 4k]
        [--out benchmarks/results/proposer_cost] [--max-tokens 32]
    python benchmarks/proposer_cost.py --micro          # the fill alone, old loop vs kernel

Engine mode runs one in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine
core, model runner and proposer share this process and thread) on a tiny random-weight
Llama (hidden 128, 4 heads, 2 layers, ``max_model_len`` 4608) with Jacobi ``k=16`` and the
package's default fill, greedy, ``ignore_eos``. It wraps, in this script only:

* ``JacobiProposer.propose``, ``.observe_verification`` and ``.step_started`` (the
  adaptive policy's step timing): perf_counter, summed per step;
* ``GPUModelRunner.execute_model`` + ``.sample_tokens`` (the CPU runner inherits both): one
  engine step of the runner = forward pass + sampling + verification bookkeeping + the
  proposer, which runs inside ``sample_tokens``.

Timing the runner's own two calls is more faithful than dividing the generate wall time
by the number of propose calls: that wall time also holds scheduling, detokenisation and
output handling, and prefill steps, which would dilute the share differently per setting.
The whole engine step (``engine step ms``: from one ``execute_model`` call to the next,
so scheduling, output handling and detokenisation included) is reported too, with the
proposer's share of it.

Only *decode* steps count (every scheduled request schedules at most ``k + 1`` tokens);
prefill chunks are dominated by the prompt forward and are reported only as a count.
A small warm-up generate runs first, so one-time costs (numba compilation, first-call
allocations) stay out of the numbers.

Settings (prompts: random tokens in which earlier stretches recur, so n-gram searches find
matches at some steps and scan the whole window at others):

* ``1k``: 64 sequences, ~1,000-token contexts
* ``short``: 256 sequences, 100-200-token contexts
* ``4k``: 64 sequences, ~4,000-token contexts

Micro mode times only the fill for a batch (default policy, k=16, tails of 0..16 tokens,
int32 token buffer as vLLM keeps it): the per-row loop over the pure-numpy ``fill_guess``
that the proposer used up to d9df2ed (frozen as ``_reference_fill_guess`` in
tests/test_fill_batch.py) against one :func:`cllm_vllm.fill.fill_guesses` call.

Writes ``<out>/<label>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 16
MAX_MODEL_LEN = 4608
# name: (sequences, min context, max context)
SETTINGS = {
    "1k": (64, 900, 1100),
    "short": (256, 100, 200),
    "4k": (64, 3900, 4100),
}
MICRO_SETTINGS = [(64, 1000), (256, 200), (64, 4000), (256, 4000)]


def repetitive_tokens(rng: np.random.Generator, n: int, vocab: int = 500) -> list[int]:
    """``n`` random tokens (3..vocab-1) in which about a third are copies of earlier stretches."""
    out: list[int] = []
    while len(out) < n:
        if len(out) > 8 and rng.random() < 0.3:
            s = int(rng.integers(0, len(out) - 4))
            out.extend(out[s : s + int(rng.integers(4, 30))])
        else:
            out.extend(rng.integers(3, vocab, size=int(rng.integers(5, 40))).tolist())
    return out[:n]


# --- engine mode ---------------------------------------------------------------------------


class StepTimer:
    """Per-step sums of the proposer's two entry points and of the runner's two calls."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.on = False

    def _cur(self) -> dict | None:
        return self.steps[-1] if (self.on and self.steps) else None

    def install(self) -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        from cllm_vllm.proposer import JacobiProposer

        timer = self

        def timed(cls, name, key, new_step=False):
            orig = getattr(cls, name, None)
            if orig is None:  # an entry point this version of the proposer lacks
                print(f"note: {cls.__name__}.{name} not found, not timed", flush=True)
                return

            def wrapper(self_, *args, **kwargs):
                if new_step and timer.on:
                    sched = args[0] if args else kwargs.get("scheduler_output")
                    counts = list(getattr(sched, "num_scheduled_tokens", {}).values())
                    timer.steps.append({"start": time.perf_counter(), "propose": 0.0,
                                        "observe": 0.0, "runner": 0.0, "reqs": len(counts),
                                        "max_sched": max(counts, default=0)})
                t0 = time.perf_counter()
                try:
                    return orig(self_, *args, **kwargs)
                finally:
                    cur = timer._cur()
                    if cur is not None:
                        cur[key] += time.perf_counter() - t0

            wrapper.__wrapped__ = orig
            setattr(cls, name, wrapper)

        timed(GPUModelRunner, "execute_model", "runner", new_step=True)
        timed(GPUModelRunner, "sample_tokens", "runner")
        timed(JacobiProposer, "propose", "propose")
        timed(JacobiProposer, "observe_verification", "observe")
        # The adaptive policy's step timing (called from the runner's execute_model).
        timed(JacobiProposer, "step_started", "observe")


def build_model(model_dir: Path) -> Path:
    if (model_dir / "config.json").exists():
        return model_dir
    from cllm_vllm.training.tiny import build_tiny_model, synthetic_text, train_tokenizer

    tok = train_tokenizer(synthetic_text(3000), 512, model_dir / "tokenizer")
    # initializer_range=0.1: peaked logits, so greedy continuations loop (as in the tests)
    build_tiny_model(model_dir, tok, "llama", hidden_size=128, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.1, seed=1)
    return model_dir


def run_engine(args) -> dict:
    import cllm_vllm
    import cllm_vllm.fill as fill

    print(f"cllm_vllm imported from {Path(cllm_vllm.__file__).parent}", flush=True)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = build_model(Path(args.model_dir))
    timer = StepTimer()
    timer.install()
    llm = LLM(str(model), speculative_config={"method": "jacobi", "num_speculative_tokens": K},
              max_model_len=MAX_MODEL_LEN, max_num_seqs=256, max_num_batched_tokens=16384,
              enforce_eager=True, dtype="float32", kv_cache_memory_bytes=768 * 2**20, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    def generate(prompts):
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                     use_tqdm=False)

    rng = np.random.default_rng(0)
    generate([repetitive_tokens(rng, 300) for _ in range(8)])  # warm-up, not timed

    results = {}
    for name in args.settings:
        n_seq, lo, hi = SETTINGS[name]
        prompts = [repetitive_tokens(rng, int(rng.integers(lo, hi + 1))) for _ in range(n_seq)]
        timer.steps, timer.on = [], True
        t0 = time.perf_counter()
        generate(prompts)
        wall = time.perf_counter() - t0
        timer.on = False
        steps = timer.steps
        # A whole engine step: from one runner call to the next (scheduling, output handling
        # and detokenisation included); the last step has no next one.
        for s, nxt in zip(steps, steps[1:]):
            s["engine"] = nxt["start"] - s["start"]
        decode = [s for s in steps if 0 < s["max_sched"] <= K + 1]
        mean = lambda key: 1e3 * float(np.mean([s[key] for s in decode if key in s]))  # noqa: E731
        row = {
            "sequences": n_seq,
            "context": [lo, hi],
            "max_tokens": args.max_tokens,
            "steps": len(steps),
            "decode_steps": len(decode),
            "mean_reqs_per_decode_step": round(float(np.mean([s["reqs"] for s in decode])), 1),
            "propose_ms": round(mean("propose"), 3),
            "observe_ms": round(mean("observe"), 3),
            "step_ms": round(mean("runner"), 3),
            "engine_step_ms": round(mean("engine"), 3),
            "generate_s": round(wall, 2),
        }
        proposer = row["propose_ms"] + row["observe_ms"]
        row["share_pct"] = round(100 * proposer / row["step_ms"], 2)
        row["share_of_engine_step_pct"] = round(100 * proposer / row["engine_step_ms"], 2)
        results[name] = row
        print(name, row, flush=True)
    return {
        "mode": "engine",
        "k": K,
        "fill": fill.DEFAULT_FILL,
        "cllm_vllm": str(Path(cllm_vllm.__file__).parent),
        "results": results,
    }


def engine_table(results: dict) -> str:
    lines = [
        "| setting | seqs | context | steps (decode) | propose ms/step | observe ms/step "
        "| step ms | share % | engine step ms | share of engine step % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['sequences']} | {r['context'][0]}-{r['context'][1]} "
            f"| {r['steps']} ({r['decode_steps']}) | {r['propose_ms']:.2f} "
            f"| {r['observe_ms']:.2f} | {r['step_ms']:.1f} | {r['share_pct']:.1f} "
            f"| {r['engine_step_ms']:.1f} | {r['share_of_engine_step_pct']:.1f} |")
    return "\n".join(lines)


# --- micro mode ----------------------------------------------------------------------------


def _load_reference():
    """The pre-kernel pure-numpy fill_guess, frozen in the tests, and the same confined to
    the n-gram window (what fill_guesses must equal)."""
    path = REPO / "tests" / "test_fill_batch.py"
    spec = importlib.util.spec_from_file_location("_fill_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._reference_fill_guess, mod._windowed_reference


def _best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by other load on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_micro(args) -> dict:
    import cllm_vllm.fill as fill

    t0 = time.perf_counter()
    first_warm = fill.warm_up()
    reference, windowed_reference = _load_reference()
    policy = fill.DEFAULT_FILL
    results = {}
    rng = np.random.default_rng(0)
    for rows, ctx_len in MICRO_SETTINGS:
        token_ids = np.zeros((rows, MAX_MODEL_LEN), np.int32)  # vLLM's token_ids_cpu
        num_tokens = rng.integers(ctx_len - ctx_len // 10, ctx_len + ctx_len // 10 + 1,
                                  size=rows)
        for i, n in enumerate(num_tokens):
            token_ids[i, :n] = repetitive_tokens(rng, int(n))
        tails = rng.integers(3, 500, size=(rows, K)).astype(np.int64)
        tail_lens = rng.integers(0, K + 1, size=rows)
        out = np.empty((rows, K), np.int64)

        def old():
            return [reference(token_ids[i, : num_tokens[i]], tails[i, : tail_lens[i]], K,
                              policy) for i in range(rows)]

        def new():
            fill.fill_guesses(token_ids, num_tokens, tails, tail_lens, K, policy, out)

        got = old()
        new()
        want = [windowed_reference(token_ids[i, : num_tokens[i]], tails[i, : tail_lens[i]], K,
                                   policy, fill.NGRAM_WINDOW) for i in range(rows)]
        same = all(out[i].tolist() == w.tolist() for i, w in enumerate(want))
        # rows where the window changed the guess (contexts longer than the window only)
        changed = sum(out[i].tolist() != g.tolist() for i, g in enumerate(got))
        # rows whose context ends in a seen bigram (the copy replaces the tail)
        copied = sum(
            fill._latest_suffix_match(token_ids[i], 0, int(num_tokens[i]), fill.MAX_NGRAM, 2) >= 0
            for i in range(rows))
        t_old = _best_of(old, args.repeats)
        t_new = _best_of(new, args.repeats * 5)
        key = f"{rows}x{ctx_len}"
        results[key] = {
            "rows": rows, "context": ctx_len, "old_ms": round(1e3 * t_old, 3),
            "new_ms": round(1e3 * t_new, 4), "speedup": round(t_old / t_new, 1),
            "copy_first_matched_rows": int(copied), "rows_changed_by_window": int(changed),
            "identical_to_windowed_reference": same,
        }
        print(key, results[key], flush=True)
    return {"mode": "micro", "k": K, "fill": policy, "window": fill.NGRAM_WINDOW,
            "first_warm_up_s": round(first_warm, 3),
            "total_s": round(time.perf_counter() - t0, 1), "results": results}


def micro_table(results: dict) -> str:
    lines = ["| batch | old per-row loop ms | fill_guesses ms | speedup | rows copied "
             "| rows changed by the window | = windowed reference |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, r in results.items():
        lines.append(f"| {r['rows']} x {r['context']} | {r['old_ms']:.2f} | {r['new_ms']:.3f} "
                     f"| {r['speedup']:.0f}x | {r['copy_first_matched_rows']}/{r['rows']} "
                     f"| {r['rows_changed_by_window']} | {r['identical_to_windowed_reference']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default=None, help="JSON file name (default: engine / micro)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "proposer_cost"))
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model-dir", default="results/tiny-llama-4k",
                    help="built here on first use")
    ap.add_argument("--micro", action="store_true", help="time the fill alone")
    ap.add_argument("--repeats", type=int, default=20,
                    help="micro: timed runs of the old loop (the kernel: 5x); the fastest counts")
    args = ap.parse_args(argv)

    if args.micro:
        report = run_micro(args)
        table = micro_table(report["results"])
        label = args.label or "micro"
        print(f"\nfill of one batch, policy {report['fill']}, k={K}, window "
              f"{report['window']}; first warm_up() {report['first_warm_up_s']} s")
    else:
        report = run_engine(args)
        table = engine_table(report["results"])
        label = args.label or "engine"
        print(f"\nproposer share of decode steps, k={K}, fill {report['fill']}, "
              f"{args.max_tokens} tokens per sequence")
    print(table)
    report["table"] = table
    out = Path(args.out) / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
