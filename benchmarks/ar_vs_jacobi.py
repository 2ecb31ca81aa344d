"""AR vs Jacobi decoding in the same vLLM build, same model, same prompts, one run.

Prints tokens per step and output tokens/s for each, and the ratio; saves JSON. Ratios
measured side by side are what to compare: absolute numbers on a shared CPU are noisy.

    python benchmarks/ar_vs_jacobi.py --model PATH [--k 7] [--batch 1 16] [--num-prompts 32]

Without --model it builds the tests' looping tiny model (a random-weight Llama whose greedy
output cycles), which shows the mechanics, not a CLLM's gain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def load_prompts(model: str, path: str | None, n: int) -> list[list[int]]:
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if path:
        lines = Path(path).read_text().splitlines()[:n]
        return [tok(json.loads(line)["prompt"]).input_ids for line in lines]
    rng = np.random.default_rng(0)
    return [rng.integers(3, len(tok), size=int(rng.integers(8, 64))).tolist() for _ in range(n)]


def run(llm, prompts, batch: int, max_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cllm_vllm.stats import batch_acceptance

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = [TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + batch]]
        outputs += llm.generate(chunk, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    spec = outputs[0].outputs[0].spec_decode_metrics is not None
    return {
        "tokens_per_step": batch_acceptance(outputs).tokens_per_step if spec else 1.0,
        "output_tokens_per_s": n_out / elapsed,
        "seconds": elapsed,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None, help="JSONL with a 'prompt' field per line")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=7, help="Jacobi block size")
    ap.add_argument("--fill", default=None, help="Jacobi fill policy (default: package default)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="results/ar_vs_jacobi.json")
    args = ap.parse_args(argv)

    from vllm import LLM

    model = args.model
    if model is None:
        from cllm_vllm.training.tiny import build_looping_model

        model = "results/tiny-looping-llama"
        build_looping_model(model)
    prompts = load_prompts(model, args.prompts, args.num_prompts)
    common = dict(dtype="float32", enforce_eager=True, max_model_len=1024,
                  kv_cache_memory_bytes=128 * 2**20)
    spec = {"method": "jacobi", "num_speculative_tokens": args.k}
    if args.fill:
        spec["fill"] = args.fill
    engines = {
        "AR": LLM(model, **common),
        f"Jacobi k={args.k}": LLM(model, speculative_config=spec,
                                  per_request_spec_decode_metrics="summary", **common),
    }
    rows = []
    for batch in args.batch:
        results = {name: run(llm, prompts, batch, args.max_tokens) for name, llm in engines.items()}
        ar, jac = results["AR"], results[f"Jacobi k={args.k}"]
        rows.append({
            "batch": batch,
            "ar_tokens_per_s": ar["output_tokens_per_s"],
            "jacobi_tokens_per_s": jac["output_tokens_per_s"],
            "speedup": jac["output_tokens_per_s"] / ar["output_tokens_per_s"],
            "jacobi_tokens_per_step": jac["tokens_per_step"],
            "identical_outputs": ar["token_ids"] == jac["token_ids"],
        })
    print(f"model={model} k={args.k} prompts={len(prompts)} max_tokens={args.max_tokens}")
    print(f"{'batch':>5} {'AR tok/s':>10} {'Jacobi tok/s':>13} {'speedup':>8} "
          f"{'tok/step':>9} {'identical':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ar_tokens_per_s']:>10.1f} {r['jacobi_tokens_per_s']:>13.1f} "
              f"{r['speedup']:>7.2f}x {r['jacobi_tokens_per_step']:>9.2f} "
              f"{str(r['identical_outputs']):>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": str(model), "k": args.k, "rows": rows},
                                         indent=1))
    return 0 if all(r["identical_outputs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
