"""Fill policies: how a guess block is started and topped up to ``k`` tokens.

After a Jacobi step the unaccepted tail ``a[j+1:]`` is the next guess, but it is
``j + 1`` tokens short of the block size; a new request has no tail at all. A fill policy
supplies the missing tokens from what is already known. Serving (the proposer) and
trajectory collection (the initial guess of every block) both call :func:`fill_guess`,
so a CLLM is trained on the same kind of guesses it is served with.

Policies:

* ``ngram``: continue the sequence (context + tail) by copying what followed
  the most recent earlier occurrence of its last ``n`` tokens, longest ``n`` first;
  the copy reads its own output, so a repeating pattern extends itself. Falls back to
  ``repeat`` when nothing matches.
* ``prompt``: tokens drawn from the prompt, as the CLLM reference initialises its
  blocks; deterministic in (prompt, position) so that a recomputed request proposes the
  same block.
* ``repeat``: the last known token, repeated.
* ``ngram-first`` (default): when the exact tokens end in an n-gram (n >= 2) seen before, propose
  its continuation instead of the Jacobi tail; otherwise as ``ngram``. A model that was
  not consistency-trained makes poor tails but loops, and loops are what n-grams catch.
* ``ngram-loop``: as ``ngram-first``, but only a seen n-gram of ``LOOP_NGRAM`` tokens
  overrides the tail. A consistency-trained model's tail is usually better than the copy
  after a seen bigram (numbers and phrases recur in text that does not loop); a long
  repeat is a loop, where the copy is better.

The default was chosen by measurement: see ``benchmarks/fill_policy.py`` and the README.
"""

from __future__ import annotations

import numpy as np

FILL_POLICIES = ("ngram", "prompt", "repeat", "ngram-first", "ngram-loop")
DEFAULT_FILL = "ngram-first"
MAX_NGRAM = 4
LOOP_NGRAM = 6
# Policies that propose a seen n-gram's continuation instead of the tail: the shortest
# match that counts.
_COPY_FIRST = {"ngram-first": 2, "ngram-loop": LOOP_NGRAM}


def _ngram_continuation_start(seq: np.ndarray, max_n: int, min_n: int = 1) -> int:
    """Index right after the latest earlier occurrence of the longest matching suffix, or -1."""
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Candidate starts i in [0, length - n - 1]: the occurrence must end before the
        # suffix itself starts overlapping its own last token.
        span = length - n
        mask = np.ones(span, dtype=bool)
        suffix = seq[length - n :]
        for t in range(n):
            mask &= seq[t : span + t] == suffix[t]
        hits = np.flatnonzero(mask)
        if hits.size:
            return int(hits[-1]) + n
    return -1


def fill_guess(
    context: np.ndarray,
    tail: np.ndarray,
    k: int,
    policy: str = DEFAULT_FILL,
    num_prompt_tokens: int | None = None,
    max_ngram: int = MAX_NGRAM,
) -> np.ndarray:
    """Return a guess block of exactly ``k`` tokens that starts with ``tail``.

    ``context`` holds every exact token so far (prompt and output, the newest last);
    ``tail`` is the Jacobi-updated remainder of the previous block (may be empty).
    """
    if k < 1:
        raise ValueError(f"block size must be >= 1, got {k}")
    context = np.asarray(context, dtype=np.int64)
    if policy in _COPY_FIRST:
        n = _COPY_FIRST[policy]
        start = _ngram_continuation_start(context, max(max_ngram, n), min_n=n)
        if start >= 0:
            return np.resize(context[start:], k)
        policy = "ngram"
    tail = np.asarray(tail, dtype=np.int64)[:k]
    need = k - len(tail)
    if need == 0:
        return tail
    if policy == "ngram":
        seq = np.concatenate([context, tail])
        start = _ngram_continuation_start(seq, max_ngram)
        if start < 0:
            extra = np.full(need, seq[-1] if len(seq) else 0, dtype=np.int64)
        else:
            # Copy forward from `start`; where the source runs into the end, the copy
            # reads its own output, i.e. the last period repeats: a cyclic tile.
            extra = np.resize(seq[start:], need)
    elif policy == "prompt":
        n_prompt = len(context) if num_prompt_tokens is None else num_prompt_tokens
        prompt = context[: max(1, n_prompt)] if len(context) else np.zeros(1, np.int64)
        # Seeded by prompt length and position so that a recomputed request (after
        # preemption) proposes the same tokens as before.
        rng = np.random.default_rng((len(prompt), len(context) + len(tail)))
        extra = prompt[rng.integers(0, len(prompt), size=need)]
    elif policy == "repeat":
        last = tail[-1] if len(tail) else (context[-1] if len(context) else 0)
        extra = np.full(need, last, dtype=np.int64)
    else:
        raise ValueError(f"unknown fill policy {policy!r}; choose one of {FILL_POLICIES}")
    return np.concatenate([tail, extra])
