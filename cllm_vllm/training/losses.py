"""CLLM losses as pure functions of logits (Kou et al. 2024, "CLLMs", section 3.2).

Every function takes logits already aligned with what they score: ``logits[..., i, :]`` is
the distribution for the token at block position ``i`` (the caller shifts by one). Losses
are per sample (shape ``[batch]``); the trainer averages them over the global batch.

Notation: ``x`` the prompt, ``y*`` a block's fixed point (the teacher's AR greedy output),
``y_j`` the j-th Jacobi state of that block, ``q_theta`` the student, ``q_theta-`` the same
model under stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("fkl", "rkl", "jsd")


def token_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    distance: str = "fkl",
    beta: float = 0.5,
) -> torch.Tensor:
    """``D(p || q)`` per position over the last (vocabulary) dimension, in float32.

    * ``fkl``: forward KL, ``sum_v p log(p / q)``: the paper's choice (mode-covering).
    * ``rkl``: reverse KL, ``sum_v q log(q / p)`` (mode-seeking).
    * ``jsd``: generalised Jensen-Shannon of GKD (Agarwal et al. 2023), which the paper
      cites for the choice of ``D``: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
      ``m = beta p + (1 - beta) q``.

    ``p`` (teacher) is detached: gradients reach the student only.
    """
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    if distance == "fkl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if distance == "rkl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if distance == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logsumexp(
            torch.stack([log_p + torch.log(torch.tensor(beta)),
                         log_q + torch.log(torch.tensor(1.0 - beta))]), dim=0)
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    distance: str = "fkl",
) -> torch.Tensor:
    """Consistency loss per sample: ``sum_i mask_i * D(q_theta-(.|t_<i, x) || q_theta(.|y_<i, x))``.

    Global consistency (GC, eq. 4 of the paper): the teacher side ``t`` is the fixed
    point ``y*`` and the student side a random state ``y_j``. Local consistency (LC,
    eq. 5): ``t = y_(j+1)``, the next state. Logits are ``[batch, n, vocab]`` over the
    ``n`` block positions; ``mask`` (``[batch, n]``) drops padding and positions the
    caller knows carry no signal. Summed over positions as in the paper, not averaged.
    """
    div = token_divergence(teacher_logits, student_logits, distance)
    return (div * mask.to(div.dtype)).sum(-1)


def ar_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Autoregressive loss per sample: mean over ``mask`` of ``-log q_theta(label_i | .)``.

    With ``label_smoothing = e`` the target is ``(1 - e) onehot + e / V`` (the reference
    trains with ``e = 0.1``). Logits ``[batch, T, vocab]``, labels and mask ``[batch, T]``.
    A sample whose mask is empty contributes 0.
    """
    ce = F.cross_entropy(
        logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none",
        label_smoothing=label_smoothing,
    )
    m = mask.to(ce.dtype)
    return (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def unconverged_mask(state: torch.Tensor, fixed_point: torch.Tensor) -> torch.Tensor:
    """True from the first position where ``state`` differs from ``y*`` onwards.

    The prediction for block position ``i`` is conditioned on ``state[:i]``; up to and
    including the first mismatch that context equals the fixed point's, so the student
    already sees the teacher's input there. Positions before the first mismatch are the
    "already converged prefix" the paper's loss leaves out.
    """
    return (state != fixed_point).int().cumsum(-1) > 0
