"""``cllm-vllm collect`` and ``cllm-vllm train``: argument parsing and input checks.

Every check on user input runs before any model work starts, and its message names the
file or option at fault.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..fill import DEFAULT_FILL, FILL_POLICIES
from ..ray_cluster import RayOptions
from .losses import DISTANCES


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback."""


def add_collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="HF model directory")
    p.add_argument("--prompts", required=True,
                   help="JSONL ({'prompt'} or {'messages'}, optional 'answer') or ShareGPT JSON")
    p.add_argument("--out", required=True, help="trajectory directory (resumes if present)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--fill", choices=FILL_POLICIES, default=DEFAULT_FILL)
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    add_ray_args(p, "teacher replicas")


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS of its head (e.g. 10.0.0.1:6379), "
                        "or none for RAY_ADDRESS, a cluster running on this machine, "
                        "or a new local instance")
    p.add_argument("--workers", type=int, default=RayOptions.workers, help=f"{what} on Ray")
    p.add_argument("--cpus-per-worker", type=int, default=RayOptions.cpus_per_worker,
                   help="CPUs per replica where the cluster has no GPU (one GPU each "
                        "where it has)")


def ray_options(args):
    """The --ray flags as RayOptions (None without --ray), checked."""
    if args.ray is None:
        if (args.workers, args.cpus_per_worker) != (RayOptions.workers,
                                                    RayOptions.cpus_per_worker):
            raise UsageError("--workers and --cpus-per-worker need --ray")
        return None
    if args.workers < 1 or args.cpus_per_worker < 1:
        raise UsageError("--workers and --cpus-per-worker must be >= 1")
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # (not imported: see ray_cluster.connect)
        raise UsageError("--ray needs Ray: pip install 'cllm-vllm[ray]'")
    return RayOptions(address=args.ray or None, workers=args.workers,
                      cpus_per_worker=args.cpus_per_worker)


def run_collect(args) -> int:
    from .data import load_records
    from .trajectories import CollectConfig, collect

    for name in ("block_size", "max_new_tokens", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    _require_model_dir(args.teacher, "--teacher")
    ray = ray_options(args)
    if ray is not None and args.device is not None:
        raise UsageError("--device and --ray are exclusive: Ray replicas take a GPU each "
                         "where the cluster has GPUs, else CPUs")
    records = load_records(args.prompts)[: args.limit]
    cfg = CollectConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, shard_size=args.shard_size, fill=args.fill)
    manifest = collect(args.teacher, records, args.out, cfg, device=args.device,
                       dtype=args.dtype, ray=ray)
    blocks = sum(s["blocks"] for s in manifest["shards"].values())
    dropped = sum(s["dropped_blocks"] for s in manifest["shards"].values())
    print(f"{manifest['num_prompts']} prompts -> {blocks} blocks in {args.out} "
          f"({dropped} looping blocks dropped)")
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory to start from "
                   "(the teacher)")
    p.add_argument("--data", required=True, help="trajectory directory from `collect`")
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--consistency", choices=("global", "local"), default="global")
    p.add_argument("--distance", choices=DISTANCES, default="fkl")
    p.add_argument("--ar-weight", type=float, default=10.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ar-labels", choices=("teacher", "ground-truth"), default="teacher",
                   help="AR targets: the teacher's greedy output or the data's answers")
    p.add_argument("--replay", default=None,
                   help="prompts with answers (JSONL or ShareGPT JSON, as for `collect`), "
                        "e.g. the teacher's training set: each sample adds AR on one of them")
    p.add_argument("--replay-weight", type=float, default=None,
                   help="weight of the replay AR loss (default: --ar-weight)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="replay rows are cut to this many tokens")
    p.add_argument("--block-size", type=int, default=None,
                   help="expected block size (checked against the data)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0, help="used when --steps is not set")
    p.add_argument("--batch-size", type=int, default=8, help="per process, per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the model (torchrun only)")
    p.add_argument("--dtype", choices=("auto", "float32", "bf16"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _require_model_dir(path: str, flag: str) -> None:
    p = Path(path)
    if not (p / "config.json").exists():
        raise UsageError(f"{flag} {path}: not an HF model directory (no config.json)")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UsageError(f"{flag} {path}: no weights (*.safetensors) in the directory")


def _check_tokenizer(tok, model_dir: str, flag: str) -> int | None:
    """The model's vocabulary size, once its tokenizer is known to fit it."""
    from .data import model_vocab_size, tokenizer_mismatch

    vocab = model_vocab_size(model_dir)
    problem = tokenizer_mismatch(tok, vocab)
    if problem:
        raise UsageError(f"{flag} {model_dir}: {problem}")
    return vocab


def prepare_train(args):
    """Validate everything and build (model, tokenizer, objective, config); no training yet."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import DataError, answer_pairs, load_records, padding_id
    from .objectives import CLLMObjective
    from .trainer import TrainConfig
    from .trajectories import block_samples, load

    _require_model_dir(args.model, "--model")
    if args.ar_weight < 0 or not 0 <= args.label_smoothing < 1:
        raise UsageError("--ar-weight must be >= 0 and --label-smoothing in [0, 1)")
    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if args.epochs <= 0:
        raise UsageError("--epochs must be > 0")
    if args.replay_weight is not None and (args.replay is None or args.replay_weight < 0):
        raise UsageError("--replay-weight needs --replay and must be >= 0")
    tok = AutoTokenizer.from_pretrained(args.model)
    vocab = _check_tokenizer(tok, args.model, "--model")
    manifest, records = load(args.data, args.block_size, tok)
    blocks = block_samples(records, manifest.get("eos_ids", [tok.eos_token_id]))
    pad_id = padding_id(tok, vocab if vocab is not None else len(tok))
    replay, replay_weight = None, 0.0
    if args.replay is not None:
        try:
            replay = answer_pairs(tok, load_records(args.replay), args.max_len)
        except DataError as e:
            raise UsageError(f"--replay {args.replay}: {e}") from e
        if not replay:
            raise UsageError(f"--replay {args.replay}: no prompt shorter than "
                             f"--max-len / 2 = {args.max_len // 2} tokens")
        replay_weight = args.ar_weight if args.replay_weight is None else args.replay_weight
    objective = CLLMObjective(blocks, pad_id, args.consistency, args.distance,
                              args.ar_weight, args.label_smoothing, args.ar_labels,
                              replay=replay, replay_weight=replay_weight,
                              max_len=args.max_len)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.batch_size * args.grad_accum * world
    steps = args.steps or max(1, round(args.epochs * objective.num_samples / per_step))
    cfg = TrainConfig(
        out_dir=args.out, steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=round(args.warmup_ratio * steps),
        weight_decay=args.weight_decay, seed=args.seed, dtype=args.dtype,
        save_every=args.save_every, resume=args.resume, fsdp=args.fsdp,
        progress=not args.no_progress,
        extra={"objective": "cllm", "consistency": args.consistency,
               "distance": args.distance, "ar_weight": args.ar_weight,
               "ar_labels": args.ar_labels, "label_smoothing": args.label_smoothing,
               "data": str(args.data), "block_size": manifest["block_size"],
               "blocks": objective.num_samples, "replay": args.replay,
               "replay_weight": replay_weight},
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    return model, tok, objective, cfg


def run_train(args) -> int:
    from .trainer import train

    model, tok, objective, cfg = prepare_train(args)
    records = train(model, tok, objective, cfg)
    if records:
        print(f"trained {cfg.steps} steps on {objective.num_samples} blocks; final loss "
              f"{records[-1]['loss']:.4f}; model in {cfg.out_dir}")
    return 0
