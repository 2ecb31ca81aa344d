"""One training loop for every objective: the teacher's LM pretraining and the CLLM losses.

What the loop owns: the sample order (a seeded permutation per epoch, so a resumed or
multi-process run sees exactly the samples a single uninterrupted one would), gradient
accumulation, AdamW with a cosine schedule and warm-up, mixed precision, DDP/FSDP under
``torchrun``, periodic checkpoints with ``resume``, progress and a JSONL loss log. What an
objective owns: turning sample indices into a padded batch and a batch into losses.

Global batch = ``batch_size * world_size * grad_accum``. Every sample's loss is
normalised on its own and the batch takes their mean, so the loss and the gradient do not
depend on how the global batch is split over processes and micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    out_dir: str
    steps: int
    batch_size: int = 8
    """Samples per process per micro-batch."""
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    """``auto``: bf16 autocast where the device supports it (CUDA with bf16), else float32."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue from the newest ``checkpoint-*`` in ``out_dir`` (a fresh start if none)."""
    fsdp: bool = False
    """Shard parameters with FSDP2 under torchrun; its checkpoints hold full weights but
    not the optimizer state (a resumed FSDP run restarts AdamW's moments)."""
    log_every: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)
    """Objective settings, recorded in the log and checkpoints."""


class Objective(Protocol):
    num_samples: int

    def collate(self, samples: list[tuple[int, random.Random]]) -> dict[str, torch.Tensor]:
        """Padded tensors for these ``(index, rng)`` samples.

        Each sample's ``rng`` is seeded by its position in the global sample stream, so
        any random choice (e.g. which Jacobi state) is the same however the batch is split.
        """

    def losses(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample losses (shape ``[batch]``); key ``loss`` is the one optimised."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_indices(step: int, micro: int, rank: int, world: int, cfg: TrainConfig,
                   num_samples: int) -> list[tuple[int, random.Random]]:
    """The dataset indices one process trains on in one micro-batch.

    Samples are drawn in the order of a seeded permutation per epoch; the global batch of
    ``step`` is the next ``batch_size * world * grad_accum`` of them, split micro-batch
    first, then rank. Deterministic: resuming and changing ``world`` keep the order.
    """
    per_step = cfg.batch_size * world * cfg.grad_accum
    start = step * per_step + (micro * world + rank) * cfg.batch_size
    out = []
    cache: dict[int, list[int]] = {}
    for c in range(start, start + cfg.batch_size):
        epoch, pos = divmod(c, num_samples)
        if epoch not in cache:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_samples, generator=g).tolist()
        out.append((cache[epoch][pos], random.Random(cfg.seed * 1_000_003 + c)))
    return out


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype != "auto":
        raise ValueError(f"dtype must be auto, float32 or bf16, got {cfg.dtype!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer.pt").exists()]
    return max(ckpts, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _wrap(model, cfg: TrainConfig, device, world: int):
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _full_state_dict(model, cfg: TrainConfig, world: int) -> dict:
    if world > 1 and cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_hf(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """An HF-format directory (config, safetensors, tokenizer) that vLLM loads as it is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def train(model, tokenizer, objective: Objective, cfg: TrainConfig) -> list[dict]:
    """Run the loop; writes ``checkpoint-*`` dirs, ``train_log.jsonl`` and the final model.

    Returns the log records (rank 0; others return an empty list).
    """
    from tqdm import tqdm

    rank, world = _dist()
    device = _device()
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.train()
    start_step = 0
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt is None and rank == 0:  # a fresh start: older checkpoints are not ours
        for old in out_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
    if ckpt is not None:
        from safetensors.torch import load_file

        state = {}
        for shard in sorted(ckpt.glob("*.safetensors")):  # large models save in shards
            state.update(load_file(str(shard)))
        missing, _ = model.load_state_dict(state, strict=False)
        if any(not k.endswith("lm_head.weight") for k in missing):
            raise RuntimeError(f"checkpoint {ckpt} misses weights: {missing[:5]}")
    wrapped = _wrap(model, cfg, device, world)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    log_path = out_dir / "train_log.jsonl"
    records: list[dict] = []
    if ckpt is not None:
        trainer_state = torch.load(ckpt / "trainer.pt", weights_only=False,
                                   map_location="cpu")
        if trainer_state["optimizer"] is not None and not (cfg.fsdp and world > 1):
            opt.load_state_dict(trainer_state["optimizer"])
        start_step = trainer_state["step"]
        if rank == 0 and log_path.exists():  # drop what was logged after the checkpoint
            records = [json.loads(line) for line in log_path.read_text().splitlines()]
            records = [r for r in records if r["step"] < start_step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif rank == 0 and log_path.exists():  # a fresh start: the old log is not ours
        log_path.unlink()
    amp = _autocast_dtype(cfg, device)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=rank != 0 or not cfg.progress,
               desc="train", dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            samples = sample_indices(step, micro, rank, world, cfg, objective.num_samples)
            batch = {k: v.to(device) for k, v in objective.collate(samples).items()}
            sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
            ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                parts = objective.losses(wrapped, batch)
                loss = parts["loss"].mean() / cfg.grad_accum
            loss.backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float().mean().item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:  # report the global mean (each rank holds its share)
            t = torch.tensor([totals[k] for k in sorted(totals)], device=device)
            torch.distributed.all_reduce(t)
            totals = {k: v / world for k, v in zip(sorted(totals), t.tolist(), strict=True)}
        record = {"step": step, "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                  **totals}
        if rank == 0:
            records.append(record)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}")
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _checkpoint(model, wrapped, tokenizer, opt, cfg, out_dir, done, rank, world)
    bar.close()
    state = _full_state_dict(wrapped if cfg.fsdp else model, cfg, world)
    if rank == 0:
        save_hf(model, tokenizer, out_dir, state)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if world > 1:
        torch.distributed.barrier()
    return records if rank == 0 else []


def _checkpoint(model, wrapped, tokenizer, opt, cfg, out_dir: Path, step: int, rank: int,
                world: int) -> None:
    """Write ``checkpoint-<step>`` atomically (temp dir + rename), keep the newest few."""
    state = _full_state_dict(wrapped if cfg.fsdp else model, cfg, world)
    if rank == 0:
        tmp = out_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(model, tokenizer, tmp, state)
        sharded = cfg.fsdp and world > 1
        torch.save({"step": step, "optimizer": None if sharded else opt.state_dict(),
                    "config": asdict(cfg)}, tmp / "trainer.pt")
        final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        ckpts = sorted(out_dir.glob(f"{CHECKPOINT_PREFIX}*"),
                       key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for old in ckpts[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
