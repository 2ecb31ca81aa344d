"""Jacobi trajectories of a teacher: every block state from the initial guess to the fixed point.

For each prompt, blocks of ``n`` tokens are decoded one after another (up to
``max_new_tokens`` or EOS). A block starts from the same initial guess serving uses
(:func:`cllm_vllm.fill.fill_guess`) and is updated with :func:`cllm_vllm.jacobi.jacobi_step`
until it is a fixed point, which is the teacher's AR greedy output. Many prompts run as
one batch (left-padded), and the KV cache holds the prompt and every committed block: one
iteration runs the model on ``n + 1`` new tokens per prompt, not on the whole sequence.

On disk (``out_dir``), schema version 1:

* ``manifest.json``: ``{"version", "teacher", "tokenizer_hash", "vocab_size",
  "block_size", "max_new_tokens", "batch_size", "shard_size", "fill", "dtype",
  "num_prompts", "prompts_hash",
  "shards": {name: {"records", "blocks", "dropped_blocks"}}}``.
* ``shard-00000.jsonl`` ...: prompt ``i`` lives in shard ``i // shard_size``; one JSON
  line per prompt: ``{"id", "prompt": [ids], "answer": [ids] | null, "blocks":
  [[state_0, ..., fixed_point], ...], "eos": bool}``. Every state is ``n`` token ids.
  ``answer`` is the ground-truth reply with EOS, when the data had one.

A shard is written whole (temp file, then rename) and recorded in the manifest, so a
killed run resumes at the first missing shard and nothing is lost or written twice.
Cleaning: a trajectory is cut before its first block whose fixed point is a short loop
(period <= ``n // 4``): the teacher repeating itself teaches nothing useful.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..fill import DEFAULT_FILL, fill_guess
from ..jacobi import jacobi_step

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class TrajectoryError(ValueError):
    """Trajectory data that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class CollectConfig:
    block_size: int = 16
    max_new_tokens: int = 256
    batch_size: int = 32
    shard_size: int = 256
    fill: str = DEFAULT_FILL


def tokenizer_hash(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    blob = json.dumps([vocab, special]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_loop(tokens, max_period: int) -> bool:
    """Whether ``tokens`` is one pattern of at most ``max_period`` tokens, repeated."""
    t = np.asarray(tokens)
    return any(np.array_equal(t[p:], t[:-p]) for p in range(1, max_period + 1) if p < len(t))


def _positions(attention: torch.Tensor, start: int, width: int):  # noqa: F821
    """Position ids of columns ``start .. start+width-1`` under left padding (all pads
    come first, so a column's position is its index minus the row's pad count)."""
    import torch

    pads = (attention == 0).sum(-1, keepdim=True)
    return torch.arange(start, start + width, device=attention.device)[None] - pads


def jacobi_trajectories(model, prompts: list[list[int]], cfg: CollectConfig,
                        eos_ids: set[int], pad_id: int) -> list[dict]:
    """Decode ``prompts`` as one batch; returns ``{"blocks", "eos"}`` per prompt."""
    import torch
    from transformers import DynamicCache

    n = cfg.block_size
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    bsz = len(prompts)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    att = torch.zeros((bsz, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        att[b, width - len(p):] = 1
    ids, att = ids.to(device), att.to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if width > 1:
            model(input_ids=ids[:, :-1], attention_mask=att[:, :-1],
                  position_ids=_positions(att, 0, width - 1), past_key_values=cache,
                  use_cache=True)
        cached = width - 1  # every column but the last exact token ("last") is cached
        last = ids[:, -1]
        contexts = [list(p) for p in prompts]
        out = [{"blocks": [], "eos": False} for _ in prompts]
        active = [True] * bsz
        for _ in range(-(-cfg.max_new_tokens // n)):
            guess = np.stack([fill_guess(np.array(contexts[b]), np.array([], np.int64), n,
                                         cfg.fill, len(prompts[b])) for b in range(bsz)])
            states = [[g.tolist()] for g in guess]
            converged = ~np.array(active)  # finished rows no longer hold the batch back
            att_step = torch.cat([att, torch.ones((bsz, n), dtype=att.dtype, device=device)], 1)
            pos = _positions(att_step, cached, n + 1)
            for _ in range(n + 1):  # each update fixes at least one more token
                inp = torch.cat([last[:, None], torch.from_numpy(guess).to(device)], 1)
                logits = model(input_ids=inp, attention_mask=att_step, position_ids=pos,
                               past_key_values=cache, use_cache=True).logits
                target = logits.argmax(-1).cpu().numpy()
                steps = [None if converged[b] else jacobi_step(guess[b], target[b])
                         for b in range(bsz)]
                if all(st is None or st.num_accepted == n for st in steps):
                    break  # the cache now holds [last, y*]: exact for every row
                cache.crop(-(n + 1))
                for b, step in enumerate(steps):
                    if step is None:
                        continue
                    if step.num_accepted == n:
                        converged[b] = True
                        continue
                    guess[b] = np.concatenate([step.exact, step.tail])[:n]
                    states[b].append(guess[b].tolist())
            else:
                raise RuntimeError("Jacobi iteration did not converge in n + 1 steps: "
                                   "the model's argmax is not deterministic")
            cache.crop(-1)  # keep [last, y*[:n-1]]; y*[n-1] becomes the new last token
            cached += n
            att = att_step
            last = torch.from_numpy(guess[:, -1].copy()).to(device)
            for b in range(bsz):
                if not active[b]:
                    continue
                fixed = guess[b].tolist()
                out[b]["blocks"].append(states[b])
                contexts[b].extend(fixed)
                if any(t in eos_ids for t in fixed):
                    out[b]["eos"] = True
                    active[b] = False
            if not any(active):
                break
    return out


def _clean(blocks: list[list[list[int]]], n: int) -> tuple[list, int]:
    for i, states in enumerate(blocks):
        if is_loop(states[-1], max(1, n // 4)):
            return blocks[:i], len(blocks) - i
    return blocks, 0


@dataclass(frozen=True)
class CollectJob:
    """Everything a shard needs besides the teacher's weights: a shard is a pure function
    of this and its index, so any replica may compute it, and computing it twice is safe."""

    teacher: str
    prompts: list
    answers: list
    cfg: CollectConfig
    eos_ids: frozenset
    pad_id: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.cfg.shard_size)

    def shard_range(self, s: int) -> range:
        return range(s * self.cfg.shard_size,
                     min(len(self.prompts), (s + 1) * self.cfg.shard_size))


@dataclass(frozen=True)
class Shard:
    """A computed shard: its JSON lines and block counts, for the driver to write."""

    index: int
    lines: list
    blocks: int
    dropped: int


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on a GPU, float32 on a CPU (the precision it will be served in)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def load_teacher(teacher: str | Path, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def teacher_identity(teacher: str | Path) -> dict:
    """What a replica reports before it works: data from two teachers must not mix."""
    from transformers import AutoTokenizer

    return {"teacher_fingerprint": _fingerprint(Path(teacher)),
            "tokenizer_hash": tokenizer_hash(AutoTokenizer.from_pretrained(str(teacher)))}


def compute_shard(model, job: CollectJob, s: int, on_batch=None) -> Shard:
    """Trajectories of shard ``s`` (its prompts in batches of ``cfg.batch_size``)."""
    lines, blocks, dropped = [], 0, 0
    idx_all = job.shard_range(s)
    for b0 in range(idx_all.start, idx_all.stop, job.cfg.batch_size):
        idx = list(range(b0, min(idx_all.stop, b0 + job.cfg.batch_size)))
        results = jacobi_trajectories(model, [job.prompts[i] for i in idx], job.cfg,
                                      set(job.eos_ids), job.pad_id)
        for i, res in zip(idx, results, strict=True):
            kept, cut = _clean(res["blocks"], job.cfg.block_size)
            blocks += len(kept)
            dropped += cut
            lines.append(json.dumps({"id": i, "prompt": job.prompts[i],
                                     "answer": job.answers[i], "blocks": kept,
                                     "eos": res["eos"]}))
        if on_batch is not None:
            on_batch(len(idx))
    return Shard(s, lines, blocks, dropped)


def plan_collection(teacher: str | Path, records: list[dict], out_dir: str | Path,
                    cfg: CollectConfig, dtype: str) -> tuple[CollectJob, dict, list[int]]:
    """Validate the inputs, encode the prompts and write (or check, on resume) the
    manifest. Returns the job, the manifest and the shards still to compute."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .data import (
        answer_separator,
        encode_answer,
        encode_prompt,
        model_vocab_size,
        padding_id,
        tokenizer_mismatch,
    )

    out_dir = Path(out_dir)
    teacher = Path(teacher)
    if not (teacher / "config.json").exists():
        raise TrajectoryError(f"teacher {teacher} is not an HF model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(teacher))
    problem = tokenizer_mismatch(tok, model_vocab_size(teacher))
    if problem:
        raise TrajectoryError(f"teacher {teacher}: {problem}")
    config = AutoConfig.from_pretrained(str(teacher))
    max_pos = getattr(config, "max_position_embeddings", None)
    room = max_pos - cfg.max_new_tokens - cfg.block_size if max_pos else None
    if room is not None and room < 1:
        raise TrajectoryError(f"max_new_tokens + block_size ({cfg.max_new_tokens} + "
                              f"{cfg.block_size}) leaves no room for a prompt in the "
                              f"teacher's {max_pos} positions")
    prompts, answers, cut = [], [], 0
    separator = answer_separator(tok)
    for rec in records:
        p = encode_prompt(tok, rec["messages"])
        if room is not None and len(p) > room:
            p, cut = p[-room:], cut + 1  # keep the end: the question nearest the answer
        prompts.append(p)
        answers.append(encode_answer(tok, rec["answer"], separator)
                       if rec.get("answer") else None)
    if cut:
        print(f"warning: {cut} prompts longer than {room} tokens were cut from the left")
    pad_id = padding_id(tok, config.vocab_size)
    try:  # what the loaded model's generation_config would say, without loading it
        eos = GenerationConfig.from_pretrained(str(teacher)).eos_token_id
    except OSError:  # no generation_config.json
        eos = GenerationConfig.from_model_config(config).eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} | {tok.eos_token_id}
    manifest = {
        "version": SCHEMA_VERSION, "teacher": str(teacher), "tokenizer_hash": tokenizer_hash(tok),
        "teacher_fingerprint": _fingerprint(teacher), "eos_ids": sorted(eos_ids),
        "vocab_size": config.vocab_size, **asdict(cfg), "dtype": dtype,
        "num_prompts": len(prompts),
        "prompts_hash": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
        "shards": {},
    }
    mpath = out_dir / MANIFEST
    if mpath.exists():
        old = json.loads(mpath.read_text())
        keys = [k for k in manifest if k not in ("shards", "teacher")]
        diff = [k for k in keys if old.get(k) != manifest[k]]
        if diff:
            raise TrajectoryError(
                f"{out_dir} holds trajectories collected with other settings ({', '.join(diff)}"
                f" differ); use another directory or delete it")
        manifest["shards"] = old["shards"]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(mpath, manifest)
    job = CollectJob(str(teacher), prompts, answers, cfg, frozenset(eos_ids), pad_id)
    todo = [s for s in range(job.num_shards) if shard_name(s) not in manifest["shards"]]
    return job, manifest, todo


def write_shard(out_dir: str | Path, manifest: dict, shard: Shard) -> None:
    """Write a shard whole (temp file, then rename), then record it in the manifest; the
    manifest lists shards in order, whichever order they were computed in."""
    out_dir = Path(out_dir)
    path = out_dir / shard_name(shard.index)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(shard.lines) + "\n")
    tmp.rename(path)
    manifest["shards"][shard_name(shard.index)] = {
        "records": len(shard.lines), "blocks": shard.blocks, "dropped_blocks": shard.dropped}
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    _write_json(out_dir / MANIFEST, manifest)


def collect(teacher: str | Path, records: list[dict], out_dir: str | Path,
            cfg: CollectConfig = CollectConfig(), progress: bool = True,
            device: str | None = None, dtype: str = "auto", ray=None) -> dict:
    """Collect trajectories for ``records`` (see :mod:`.data`) into shards; resumes.

    ``dtype="auto"`` runs the teacher in bfloat16 on a GPU and float32 on a CPU: the
    fixed points are the teacher's greedy output in the precision it will be served in.
    ``ray`` (a :class:`cllm_vllm.ray_cluster.RayOptions`) computes the shards on
    teacher replicas of a Ray cluster; this process still writes every file. Returns the
    manifest.
    """
    from tqdm import tqdm

    if ray is not None:
        from .ray_collect import replica_device

        device = replica_device(ray)
    elif device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(dtype, device)
    job, manifest, todo = plan_collection(teacher, records, out_dir, cfg, dtype)
    total = len(job.prompts)
    done = total - sum(len(job.shard_range(s)) for s in todo)
    bar = tqdm(total=total, disable=not progress, desc="trajectories", unit="prompt",
               initial=done)
    if ray is not None:
        from .ray_collect import compute_shards

        shards = compute_shards(job, todo, device, dtype, manifest, ray)
    else:
        model = load_teacher(teacher, device, dtype)
        shards = (compute_shard(model, job, s, on_batch=bar.update) for s in todo)
    for shard in shards:
        write_shard(out_dir, manifest, shard)
        if ray is not None:
            bar.update(len(shard.lines))
    bar.close()
    return manifest


def _fingerprint(model_dir: Path) -> str:
    """The teacher's config and weight files (names and sizes): resuming with another
    teacher must not mix two models' trajectories."""
    parts = [(model_dir / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(model_dir.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.jsonl"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.rename(path)


def load(out_dir: str | Path, block_size: int | None = None,
         tokenizer=None) -> tuple[dict, list[dict]]:
    """The manifest and records of a trajectory directory, validated.

    Raises :class:`TrajectoryError` naming the problem: no manifest, a missing or
    malformed shard, a block size other than ``block_size``, or data collected with a
    tokenizer other than ``tokenizer``.
    """
    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST
    if not mpath.exists():
        raise TrajectoryError(f"{out_dir}: no {MANIFEST}; is this a trajectory directory "
                              "written by `cllm-vllm collect`?")
    try:
        manifest = json.loads(mpath.read_text())
        n = int(manifest["block_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TrajectoryError(f"{mpath}: malformed manifest ({e})") from e
    if manifest.get("version") != SCHEMA_VERSION:
        raise TrajectoryError(f"{mpath}: schema version {manifest.get('version')}, "
                              f"this code reads {SCHEMA_VERSION}")
    if block_size is not None and block_size != n:
        raise TrajectoryError(f"{out_dir}: trajectories have block size {n}, training asked "
                              f"for {block_size}; collect again or pass --block-size {n}")
    if tokenizer is not None and tokenizer_hash(tokenizer) != manifest["tokenizer_hash"]:
        raise TrajectoryError(f"{out_dir}: collected with another tokenizer "
                              f"({manifest['tokenizer_hash']}) than the model's "
                              f"({tokenizer_hash(tokenizer)})")
    expected = -(-manifest["num_prompts"] // manifest["shard_size"])
    records = []
    for s in range(expected):
        path = out_dir / shard_name(s)
        if not path.exists() or shard_name(s) not in manifest["shards"]:
            raise TrajectoryError(f"{path} is missing: collection did not finish "
                                  "(run `cllm-vllm collect` again with the same arguments)")
        for k, line in enumerate(path.read_text().splitlines(), 1):
            try:
                rec = json.loads(line)
                blocks = rec["blocks"]
                ok = isinstance(rec["prompt"], list) and all(
                    isinstance(st, list) and len(st) == n for blk in blocks for st in blk)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TrajectoryError(f"{path}:{k}: malformed record ({e})") from e
            if not ok:
                raise TrajectoryError(f"{path}:{k}: a state is not a list of {n} token ids")
            records.append(rec)
    vocab = manifest.get("vocab_size")
    if vocab is not None:
        top = max((max(st) for r in records for blk in r["blocks"] for st in blk), default=0)
        if top >= vocab:
            raise TrajectoryError(f"{out_dir}: token id {top} >= vocab size {vocab}")
    return manifest, records


def block_samples(records: list[dict], eos_ids=()) -> list:
    """Training samples, one per block: prompt, earlier fixed points, the block's states.

    A block whose fixed point holds an EOS counts only up to it (``valid_len``).
    """
    from .objectives import BlockSample

    eos_ids = set(eos_ids)
    out = []
    for rec in records:
        prefix: list[int] = []
        for states in rec["blocks"]:
            fixed = states[-1]
            hits = [i for i, t in enumerate(fixed) if t in eos_ids]
            out.append(BlockSample(prompt=rec["prompt"], prefix_output=list(prefix),
                                   states=states, answer=rec.get("answer"),
                                   valid_len=hits[0] + 1 if hits else None))
            prefix.extend(fixed)
    return out


def teacher_outputs(records: list[dict], eos_ids=()) -> list[tuple[list[int], list[int]]]:
    """``(prompt, teacher output)`` per record: its blocks' fixed points, up to and with
    the first EOS. What drafters that imitate the teacher train on."""
    eos_ids = set(eos_ids)
    pairs = []
    for rec in records:
        out: list[int] = []
        for states in rec["blocks"]:
            out.extend(states[-1])
        hits = [i for i, t in enumerate(out) if t in eos_ids]
        pairs.append((rec["prompt"], out[: hits[0] + 1] if hits else out))
    return pairs
