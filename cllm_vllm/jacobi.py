"""One Jacobi step over token arrays: the single definition shared by serving and training.

Notation: a guess block ``g[0..k-1]`` sits after the last exact token. One
forward pass over ``[last, g0 .. g(k-1)]`` gives the model's greedy prediction at every
position, ``a[0..k]``: ``a[i]`` is the token the model wants at the position of ``g[i]``
given everything before it, and ``a[k]`` is the token after the block.

* The longest prefix with ``g[i] == a[i]`` is exact (identical to AR greedy decoding);
  ``a[j]`` right after it is exact too, because everything it was conditioned on is.
* The rest, ``a[j+1..k]``, is the Jacobi update of the unaccepted tail: the next guess.

Serving (rolling blocks) commits ``a[:j+1]`` and proposes ``a[j+1:]`` topped up by a fill
policy; trajectory collection (fixed blocks) keeps the whole updated block ``a[:n]`` as
the next state. Both call :func:`jacobi_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def accepted_prefix_len(guess: np.ndarray, target: np.ndarray) -> int:
    """Length of the longest prefix where ``guess`` agrees with the model's ``target``."""
    n = min(len(guess), len(target))
    if n == 0:
        return 0
    mismatch = np.flatnonzero(np.asarray(guess[:n]) != np.asarray(target[:n]))
    return int(mismatch[0]) if mismatch.size else n


@dataclass(frozen=True)
class JacobiStep:
    """Outcome of verifying one guess block against the model's greedy predictions."""

    num_accepted: int
    """Guess tokens that matched (``j``); the step gains ``j + 1`` exact tokens."""
    exact: np.ndarray
    """``a[:j+1]``: the accepted guess tokens plus the model's own next token."""
    tail: np.ndarray
    """``a[j+1:]``: the Jacobi update of the unaccepted tail, the start of the next guess."""


def jacobi_step(guess: np.ndarray, target: np.ndarray) -> JacobiStep:
    """Verify ``guess`` (k tokens) with the model's greedy ``target`` (k or k + 1 tokens).

    ``target`` may omit the prediction after the block (``a[k]``): then a fully
    accepted guess gains only ``k`` exact tokens.
    """
    guess = np.asarray(guess)
    target = np.asarray(target)
    if len(target) not in (len(guess), len(guess) + 1):
        raise ValueError(
            f"target must have len(guess) or len(guess) + 1 tokens, got {len(target)} "
            f"for a guess of {len(guess)}"
        )
    return split_verified(target, accepted_prefix_len(guess, target))


def split_verified(target: np.ndarray, num_accepted: int) -> JacobiStep:
    """Split the model's predictions once ``num_accepted`` guess tokens are known to hold.

    Greedy verification accepts exactly :func:`accepted_prefix_len`; vLLM's rejection
    sampler may accept fewer for sampled requests, and the split is the same.
    """
    target = np.asarray(target)
    j = num_accepted
    return JacobiStep(num_accepted=j, exact=target[: j + 1], tail=target[j + 1 :])
