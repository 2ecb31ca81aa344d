"""Which fill policy should be the default? Tokens per step for each, on one model.

Runs one vLLM engine per policy on the same prompts (a repetitive set and a varied set)
and prints tokens per step (mean exact tokens gained per verification step).

    python benchmarks/fill_policy.py --model PATH [--k 7] [--policies ngram ngram-loop]
        [--heldout N] [--out results/fill_policy.json]

Without --model it builds the tests' tiny random-weight Llama.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def prompt_sets(tokenizer_len: int, n: int = 32):
    import numpy as np

    rng = np.random.default_rng(0)
    varied = [rng.integers(3, tokenizer_len, size=int(rng.integers(8, 160))).tolist()
              for _ in range(n)]
    repetitive = []
    for _ in range(n):
        pattern = rng.integers(3, tokenizer_len, size=int(rng.integers(2, 6))).tolist()
        repetitive.append((pattern * 60)[: int(rng.integers(20, 120))])
    return {"repetitive": repetitive, "varied": varied}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None,
                    help="JSONL of {'prompt': text} to use instead of random token prompts")
    ap.add_argument("--heldout", type=int, default=0,
                    help="use N held-out prompts per domain of the bundled recipe (chat "
                         "template, stop at EOS) instead of random token prompts")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--policies", nargs="+", default=None, help="default: all")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="results/fill_policy.json")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cllm_vllm.fill import FILL_POLICIES
    from cllm_vllm.stats import batch_acceptance

    model = args.model
    if model is None:
        from cllm_vllm.training.tiny import build_tiny_model

        model = "results/tiny-random-llama"
        build_tiny_model(model, hidden_size=128, num_heads=4, num_kv_heads=2,
                         initializer_range=0.1, seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if args.heldout:
        from cllm_vllm.evaluation import DOMAINS, heldout_records
        from cllm_vllm.training.data import encode_prompt

        sets = {d: [encode_prompt(tok, r["messages"]) for r in heldout_records(d, args.heldout)]
                for d in DOMAINS}
    elif args.prompts:
        lines = Path(args.prompts).read_text().splitlines()
        sets = {"given": [tok(json.loads(line)["prompt"]).input_ids for line in lines]}
    else:
        sets = prompt_sets(len(tok))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                            ignore_eos=not args.heldout)
    results = {}
    engines = []
    for policy in args.policies or FILL_POLICIES:
        llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=1024,
                  kv_cache_memory_bytes=64 * 2**20, per_request_spec_decode_metrics="summary",
                  speculative_config={"method": "jacobi", "num_speculative_tokens": args.k,
                                      "fill": policy})
        for name, prompts in sets.items():
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                use_tqdm=False)
            results.setdefault(policy, {})[name] = round(batch_acceptance(outs).tokens_per_step, 3)
        # In-process engines share vLLM's process-global state: shutting one down breaks
        # the next (as in cllm_vllm.evaluation). They are small; keep them until the end.
        engines.append(llm)
    print(f"tokens per step, k={args.k}, model={model}")
    print(f"{'policy':<12}" + "".join(f"{n:>12}" for n in sets))
    for policy, row in results.items():
        print(f"{policy:<12}" + "".join(f"{row[n]:>12.3f}" for n in sets))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"k": args.k, "model": str(model), "results": results},
                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
