"""``cllm-vllm generate``: offline batch generation with Jacobi decoding, here or on Ray.

JSONL in (``{"prompt": str}`` or ``{"messages": [...]}`` per line, as for ``collect``),
JSONL out, one row per input row and in input order::

    {"index", "text", "token_ids", "finish_reason", "tokens_per_step"}

Prompts are tokenized here with the model's chat template, so every replica decodes the
same token ids. Rows are appended in order and flushed chunk by chunk; a killed run
resumes after the last complete row (a sidecar ``.meta.json`` holds what the rows were
made from: resuming with other inputs or settings is refused).

With ``--ray``, Ray Data runs the prompts through an actor pool of ``--workers`` vLLM
engines (one GPU each where the cluster has GPUs, else ``--cpus-per-worker`` CPUs),
each an ``LLM`` with the same speculative config; results stream back in input order.
Ray Data's own vLLM processor (``ray.data.llm``, Ray 2.60) drops vLLM's finish reason
and per-request speculative metrics from its rows, so the replicas here are plain
``vllm.LLM`` engines in a ``map_batches`` actor pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .config import DEFAULT_BLOCK_SIZE

DEFAULT_ENGINE_ARGS = {"dtype": "auto", "seed": 0}


class GenerateError(ValueError):
    """Bad input to ``generate``; printed without a traceback."""


def engine_kwargs(model: str, block_size: int | None, engine_args: dict) -> dict:
    """``vllm.LLM`` arguments: Jacobi (``block_size`` None: plain decoding) and the
    per-request metrics that give each row its tokens per step."""
    kwargs = {"model": model, **DEFAULT_ENGINE_ARGS, **engine_args}
    if block_size is not None:
        kwargs["speculative_config"] = {"method": "jacobi", "num_speculative_tokens": block_size}
        kwargs["per_request_spec_decode_metrics"] = "summary"
    return kwargs


def output_row(index: int, output: Any, jacobi: bool) -> dict:
    from .stats import request_acceptance

    completion = output.outputs[0]
    return {"index": index, "text": completion.text,
            "token_ids": list(completion.token_ids),
            "finish_reason": completion.finish_reason,
            "tokens_per_step": round(request_acceptance(output).tokens_per_step, 4)
            if jacobi else None}


def sampling_params(max_tokens: int, temperature: float, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)


class Replica:
    """One vLLM engine; called on a batch of ``{"index", "prompt_token_ids"}`` columns
    (the Ray Data actor class, and the local path)."""

    def __init__(self, kwargs: dict, params: dict) -> None:
        from vllm import LLM

        self.jacobi = "speculative_config" in kwargs
        self.llm = LLM(**kwargs)
        self.params = sampling_params(**params)

    def shutdown(self) -> None:
        """Stop the engine's processes now (left to the garbage collector, a spawned
        engine core can keep the interpreter from exiting)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, indices: Iterable[int], prompts: Iterable[list[int]]) -> list[dict]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p)))
                                  for p in prompts], self.params, use_tqdm=False)
        return [output_row(int(i), o, self.jacobi) for i, o in zip(indices, outs, strict=True)]

    def __call__(self, batch: dict) -> dict:
        rows = self.generate(batch["index"], batch["prompt_token_ids"])
        return {"row": [json.dumps(r) for r in rows]}


def encode_prompts(model: str, input_path: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from .training.data import DataError, encode_prompt, load_records

    try:
        records = load_records(input_path)
    except DataError as e:
        raise GenerateError(str(e)) from e
    tok = AutoTokenizer.from_pretrained(model)
    return [encode_prompt(tok, r["messages"]) for r in records]


def resume_point(out: Path, meta: dict) -> int:
    """Rows already written (a partial last row is cut off); checks they were made from
    the same inputs and settings."""
    meta_path = out.with_name(out.name + ".meta.json")
    if not out.exists():
        meta_path.write_text(json.dumps(meta, indent=1))
        return 0
    if not meta_path.exists() or json.loads(meta_path.read_text()) != meta:
        raise GenerateError(f"{out} exists and was made from other inputs or settings "
                            f"(see {meta_path}); choose another --output or delete it")
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        out.write_bytes(complete)  # a row cut by a kill: written again
    rows = complete.splitlines()
    for n, line in enumerate(rows):
        if json.loads(line).get("index") != n:
            raise GenerateError(f"{out}:{n + 1}: rows are not in input order; delete it")
    return len(rows)


def _local_rows(kwargs, params, prompts, start, chunk) -> Iterator[str]:
    replica = Replica(kwargs, params)
    try:
        for lo in range(start, len(prompts), chunk):
            hi = min(lo + chunk, len(prompts))
            for row in replica.generate(range(lo, hi), prompts[lo:hi]):
                yield json.dumps(row)
    finally:
        replica.shutdown()


def _ray_rows(kwargs, params, prompts, start, chunk, ray_opts) -> Iterator[str]:
    from .ray_cluster import connect, replica_resources

    ray = connect(ray_opts)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order
    resources = replica_resources(ray_opts)
    if "num_gpus" not in resources:
        # One engine per replica on its own CPUs: threads unpinned (replicas may share a
        # node), as many as the replica was given.
        resources["runtime_env"] = {"env_vars": {
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(ray_opts.cpus_per_worker)}}
        kwargs = {"distributed_executor_backend": "mp", **kwargs}
    items = [{"index": i, "prompt_token_ids": prompts[i]} for i in range(start, len(prompts))]
    ds = ray.data.from_items(items).map_batches(
        Replica, fn_constructor_kwargs={"kwargs": kwargs, "params": params},
        batch_size=chunk, compute=ray.data.ActorPoolStrategy(size=ray_opts.workers),
        batch_format="numpy", **resources)
    for row in ds.iter_rows():
        yield row["row"]


def generate(model: str, input_path: str, output: str, block_size: int | None = DEFAULT_BLOCK_SIZE,
             max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
             engine_args: dict | None = None, chunk: int = 256, ray=None,
             progress: bool = True) -> int:
    """Generate a row per prompt of ``input_path`` into ``output``; returns rows written
    by this call."""
    from tqdm import tqdm

    engine_args = dict(engine_args or {})
    prompts = encode_prompts(model, input_path)
    kwargs = engine_kwargs(model, block_size, engine_args)
    params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(Path(model).resolve()), "engine": kwargs, "sampling": params,
            "prompts": len(prompts),
            "prompts_hash": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]}
    start = resume_point(out, meta)
    if start == len(prompts):
        return 0
    rows = (_ray_rows(kwargs, params, prompts, start, chunk, ray) if ray is not None
            else _local_rows(kwargs, params, prompts, start, chunk))
    written = 0
    with out.open("a") as f, tqdm(total=len(prompts), initial=start, desc="generate",
                                  unit="prompt", disable=not progress) as bar:
        for line in rows:
            f.write(line + "\n")
            written += 1
            bar.update(1)
            if written % chunk == 0:
                f.flush()
                os.fsync(f.fileno())
    return written


def add_args(p) -> None:
    from .training.commands import add_ray_args

    p.add_argument("--model", required=True, help="HF model directory (e.g. a CLLM)")
    p.add_argument("--input", required=True,
                   help="JSONL: {'prompt': str} or {'messages': [...]} per line")
    p.add_argument("--output", required=True, help="JSONL (resumes if present)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="Jacobi block size (num_speculative_tokens)")
    p.add_argument("--no-jacobi", action="store_true", help="plain decoding (a reference)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--engine-args", default="{}",
                   help="JSON object of more vllm.LLM arguments, e.g. "
                        "'{\"tensor_parallel_size\": 2, \"max_model_len\": 2048}'")
    p.add_argument("--chunk", type=int, default=256,
                   help="prompts per engine call (and per Ray batch); rows are flushed "
                        "to disk per chunk")
    add_ray_args(p, "vLLM replicas")


def main(args) -> int:
    from .training.commands import UsageError, ray_options

    try:
        try:
            engine_args = json.loads(args.engine_args)
        except json.JSONDecodeError as e:
            raise UsageError(f"--engine-args: not JSON ({e})") from e
        if not isinstance(engine_args, dict):
            raise UsageError("--engine-args: not a JSON object of vllm.LLM arguments")
        if args.block_size < 1 or args.max_tokens < 1 or args.chunk < 1:
            raise UsageError("--block-size, --max-tokens and --chunk must be >= 1")
        if not (Path(args.model) / "config.json").exists():
            raise UsageError(f"--model {args.model}: not an HF model directory "
                             "(no config.json)")
        ray = ray_options(args)
        n = generate(args.model, args.input, args.output,
                     None if args.no_jacobi else args.block_size, args.max_tokens,
                     args.temperature, args.seed, engine_args, args.chunk, ray)
    except ValueError as e:  # UsageError, GenerateError, bad JSON, vLLM's config errors
        print(f"cllm-vllm generate: error: {e}", file=sys.stderr)
        return 2
    print(f"{n} rows written to {args.output}")
    return 0
