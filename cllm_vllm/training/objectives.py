"""What the trainer optimises: batches from data, per-sample losses from a batch.

* :class:`LMObjective`: supervised AR training on (prompt, answer) pairs; trains the
  bundled teacher.
* :class:`CLLMObjective`: consistency (global or local) plus AR loss on Jacobi
  trajectories (Kou et al. 2024); turns a teacher into a CLLM.

Both pack all rows of a step into one forward pass: DDP expects one forward per backward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .losses import ar_loss, consistency_loss, unconverged_mask


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``input_ids`` and ``attention_mask``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, : len(r)] = 1
    return ids, att


def _fit(pairs, max_len: int) -> list[tuple[list[int], list[int]]]:
    """``(prompt, answer)`` pairs with each answer cut so the row fits ``max_len``."""
    return [(p, a[: max(0, max_len - len(p))]) for p, a in pairs]


def _next_token_view(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor):
    """Align ``logits[t]`` with the token it predicts, ``ids[t + 1]``."""
    return logits[:, :-1], ids[:, 1:], loss_mask[:, 1:]


class LMObjective:
    """AR loss on the answer tokens of ``(prompt_ids, answer_ids)`` pairs.

    With ``batch_tokens`` a sample is a group of pairs of similar length whose padded size
    stays under that budget (use ``batch_size=1`` then): mixing 80- and 380-token
    sequences in one padded batch would waste most of the compute on padding. A group's
    loss is the mean of its pairs' losses. Groups are fixed by ``seed``.

    ``length_bucket`` coarsens the lengths that groups are formed by: with exact lengths
    (1) templated data falls into groups of one template each (length follows template),
    and a step then sees one kind of sample; buckets of e.g. 32 tokens mix them.
    """

    def __init__(self, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                 max_len: int = 512, label_smoothing: float = 0.0,
                 batch_tokens: int | None = None, seed: int = 0, length_bucket: int = 1):
        self.pairs = _fit(pairs, max_len)
        self.pad_id = pad_id
        self.label_smoothing = label_smoothing
        if batch_tokens is None:
            self.groups = [[i] for i in range(len(self.pairs))]
        else:
            self.groups = _length_groups([len(p) + len(a) for p, a in self.pairs],
                                         batch_tokens, seed, length_bucket)
        self.num_samples = len(self.groups)

    def collate(self, samples):
        rows, masks, owner = [], [], []
        for k, (index, _rng) in enumerate(samples):
            for i in self.groups[index]:
                prompt, answer = self.pairs[i]
                rows.append(prompt + answer)
                masks.append([0] * len(prompt) + [1] * len(answer))
                owner.append(k)
        ids, att = pad_rows(rows, self.pad_id)
        loss_mask, _ = pad_rows(masks, 0)
        return {"input_ids": ids, "attention_mask": att, "loss_mask": loss_mask,
                "owner": torch.tensor(owner)}

    def losses(self, model, batch):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        lg, labels, mask = _next_token_view(logits, batch["input_ids"], batch["loss_mask"])
        per_row = ar_loss(lg, labels, mask, self.label_smoothing)
        owner = batch["owner"]
        n = int(owner.max()) + 1
        sums = torch.zeros(n, device=per_row.device).index_add(0, owner, per_row)
        counts = torch.zeros(n, device=per_row.device).index_add(
            0, owner, torch.ones_like(per_row))
        ar = sums / counts
        return {"loss": ar, "ar": ar}


def _length_groups(lengths: list[int], batch_tokens: int, seed: int,
                   bucket: int = 1) -> list[list[int]]:
    """Indices grouped by similar length, each group's ``rows * max_len <= batch_tokens``."""
    order = sorted(range(len(lengths)),
                   key=lambda i: (-(-lengths[i] // bucket), random.Random(seed + i).random()))
    groups, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        groups.append(cur)
    return groups


@dataclass(frozen=True)
class BlockSample:
    """One block of one trajectory, as the CLLM objective trains on it."""

    prompt: list[int]
    prefix_output: list[int]
    """The fixed points of the earlier blocks of the same answer."""
    states: list[list[int]]
    """Jacobi states from the initial guess to the fixed point (the last one)."""
    answer: list[int] | None = None
    """Ground-truth answer tokens (with EOS), when the data has them."""
    valid_len: int | None = None
    """Block positions that count: up to and including an EOS in the fixed point (what
    follows EOS is never served). None: the whole block."""


class CLLMObjective:
    """``loss = consistency + ar_weight * AR`` on Jacobi trajectories.

    * ``consistency="global"`` (GC): the student sees a random non-final state ``y_j``,
      the target is the model's own distribution at the fixed point ``y*``.
    * ``consistency="local"`` (LC): the target is the next state ``y_(j+1)``.
    * AR: cross-entropy on the answer so far plus ``y*`` (the teacher's greedy output), or
      on as many tokens of the ground-truth answer with ``ar_labels="ground-truth"``.
    * Replay (optional): ``replay_weight *`` AR on one ``(prompt, answer)`` pair drawn per
      sample from ``replay`` (e.g. the teacher's whole training set), cut to the widest
      trajectory row of the micro-batch. The trajectories cover a few thousand prompts;
      AR on them alone lets a small model drift from what it knew on the rest of its data.
      The cut makes the replay loss (only it) depend on how the global batch is split over
      processes and micro-batches; it touches 2% of the recipe's replay rows.
    """

    def __init__(self, blocks: list[BlockSample], pad_id: int, consistency: str = "global",
                 distance: str = "fkl", ar_weight: float = 10.0,
                 label_smoothing: float = 0.0, ar_labels: str = "teacher",
                 replay: list[tuple[list[int], list[int]]] | None = None,
                 replay_weight: float = 0.0, max_len: int = 512):
        if consistency not in ("global", "local"):
            raise ValueError(f"consistency must be 'global' or 'local', got {consistency!r}")
        if ar_labels not in ("teacher", "ground-truth"):
            raise ValueError(f"ar_labels must be 'teacher' or 'ground-truth', got {ar_labels!r}")
        if ar_labels == "ground-truth" and any(b.answer is None for b in blocks):
            raise ValueError("ar_labels='ground-truth' needs an answer in every record; "
                             "the trajectories have prompts without one")
        if replay_weight > 0 and not replay:
            raise ValueError("replay_weight > 0 needs replay pairs")
        self.replay = _fit(replay or [], max_len)
        self.replay_weight = replay_weight
        self.blocks = [b for b in blocks if len(b.states) >= 2]
        if not self.blocks:
            raise ValueError("no trajectory block has a state before its fixed point")
        self.pad_id = pad_id
        self.consistency = consistency
        self.distance = distance
        self.ar_weight = ar_weight
        self.label_smoothing = label_smoothing
        self.ar_labels = ar_labels
        self.num_samples = len(self.blocks)

    def collate(self, samples):
        rows: list[list[int]] = []
        student, target, ar, starts, n_block = [], [], [], [], []
        masks, ar_masks = [], []
        for index, rng in samples:
            b = self.blocks[index]
            j = rng.randrange(len(b.states) - 1)
            fixed = b.states[-1]
            goal = fixed if self.consistency == "global" else b.states[j + 1]
            prefix = b.prompt + b.prefix_output
            valid = len(fixed) if b.valid_len is None else b.valid_len
            starts.append(len(prefix))
            n_block.append(valid)
            student.append(len(rows))
            rows.append(prefix + b.states[j])
            masks.append(unconverged_mask(torch.tensor(b.states[j]), torch.tensor(goal)))
            # AR covers the answer up to the end of this block, ground truth or the
            # teacher's: the row is as long as the target row, and a long reply is not
            # re-read whole for each of its blocks.
            ar_row = (b.prompt + b.answer[: len(b.prefix_output) + len(fixed)]
                      if self.ar_labels == "ground-truth" else prefix + fixed)
            if ar_row == prefix + goal:  # one row is both the AR row and the target
                target.append(len(rows))
                ar.append(len(rows))
                rows.append(ar_row)
            else:
                target.append(len(rows))
                rows.append(prefix + goal)
                ar.append(len(rows))
                rows.append(ar_row)
            ar_len = len(ar_row) if self.ar_labels == "ground-truth" else len(prefix) + valid
            ar_masks.append([0] * len(b.prompt) + [1] * (ar_len - len(b.prompt)))
        replay = []
        if self.replay_weight:
            # Cut to the widest trajectory row: a long reply would pad every row to its
            # length (2x the step time on the recipe's data). Its start still counts.
            width = max(len(r) for r in rows)
            for _index, rng in samples:
                prompt, answer = self.replay[rng.randrange(len(self.replay))]
                replay.append(len(rows))
                rows.append((prompt + answer)[:width])
                ar_masks.append(([0] * len(prompt) + [1] * len(answer))[:width])
        ids, att = pad_rows(rows, self.pad_id)
        ar_mask = torch.zeros_like(ids)
        for k, m in zip(ar + replay, ar_masks, strict=True):
            ar_mask[k, : len(m)] = torch.tensor(m)
        n = max(len(m) for m in masks)  # block size (valid lengths may be shorter)
        cons_mask = torch.zeros((len(samples), n), dtype=torch.bool)
        for i, m in enumerate(masks):
            cons_mask[i, : len(m)] = m
        return {"input_ids": ids, "attention_mask": att, "ar_mask": ar_mask,
                "student": torch.tensor(student), "target": torch.tensor(target),
                "ar": torch.tensor(ar), "replay": torch.tensor(replay, dtype=torch.long),
                "block_start": torch.tensor(starts),
                "block_len": torch.tensor(n_block), "consistency_mask": cons_mask}

    def losses(self, model, batch):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        n = batch["consistency_mask"].shape[1]
        # Block position i is predicted from the token before it: logits row start-1+i.
        pos = batch["block_start"][:, None] - 1 + torch.arange(n, device=logits.device)
        pos = pos.clamp(max=logits.shape[1] - 1)
        gather = pos[..., None].expand(-1, -1, logits.shape[-1])
        s_logits = logits[batch["student"]].gather(1, gather)
        t_logits = logits[batch["target"]].gather(1, gather).detach()
        valid = torch.arange(n, device=logits.device) < batch["block_len"][:, None]
        cons = consistency_loss(s_logits, t_logits, batch["consistency_mask"] & valid,
                                self.distance)
        ar = self._ar(logits, batch, batch["ar"])
        out = {"loss": cons + self.ar_weight * ar, "consistency": cons, "ar": ar}
        if self.replay_weight:
            out["replay"] = self._ar(logits, batch, batch["replay"])
            out["loss"] = out["loss"] + self.replay_weight * out["replay"]
        return out

    def _ar(self, logits, batch, rows):
        lg, labels, mask = _next_token_view(logits[rows], batch["input_ids"][rows],
                                            batch["ar_mask"][rows])
        return ar_loss(lg, labels, mask, self.label_smoothing)



class DrafterObjective:
    """A drafter's losses (:mod:`.drafters`) on ``(prompt, teacher output)`` pairs.

    The teacher is frozen and lives here, not in the trained module: the trainer
    optimises and checkpoints the drafter's parameters alone, under the names vLLM loads.
    """

    def __init__(self, pairs: list[tuple[list[int], list[int]]], teacher, pad_id: int,
                 max_len: int = 512):
        self.pairs = [(p, a) for p, a in _fit(pairs, max_len) if len(a) >= 2]
        if not self.pairs:
            raise ValueError("no (prompt, output) pair has two output tokens to train on")
        self.teacher = teacher.eval().requires_grad_(False)
        self.pad_id = pad_id
        self.num_samples = len(self.pairs)

    def collate(self, samples):
        rows = [self.pairs[i][0] + self.pairs[i][1] for i, _rng in samples]
        masks = [[0] * len(self.pairs[i][0]) + [1] * len(self.pairs[i][1])
                 for i, _rng in samples]
        ids, att = pad_rows(rows, self.pad_id)
        loss_mask, _ = pad_rows(masks, 0)
        return {"input_ids": ids, "attention_mask": att, "loss_mask": loss_mask}

    def losses(self, model, batch):
        from .drafters import TeacherFeatures

        ids = batch["input_ids"]
        self.teacher.to(ids.device)
        drafter = getattr(model, "module", model)  # under DDP
        feats = TeacherFeatures(self.teacher, ids, batch["attention_mask"],
                                drafter.aux_layers)
        return model(feats, ids, batch["loss_mask"])
