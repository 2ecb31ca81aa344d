"""Fill policies: how a guess block of ``k`` tokens is made from what is already known.

After a Jacobi step the unaccepted tail ``a[j+1:]`` is the natural next guess, but it is
``j + 1`` tokens short of the block size; a new request has no tail at all. A fill policy
turns (context, tail) into a full block: most policies keep the tail and top it up, the
copy-first ones (``ngram-first``, ``ngram-loop``) drop it for a copied continuation when
the context ends in an n-gram seen before. Serving (the proposer, a whole batch at a time
through :func:`fill_guesses`) and trajectory collection (the initial guess of every block,
through :func:`fill_guess`, one row of the same kernel) share this one definition, so a
CLLM is trained on the same kind of guesses it is served with.

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

Every n-gram search looks at the last ``NGRAM_WINDOW`` tokens of what it searches only.

The default was chosen by measurement: see ``benchmarks/fill_policy.py`` and the README.
"""

from __future__ import annotations

import time

import numba
import numpy as np

FILL_POLICIES = ("ngram", "prompt", "repeat", "ngram-first", "ngram-loop")
DEFAULT_FILL = "ngram-first"
MAX_NGRAM = 4
LOOP_NGRAM = 6
# Policies that propose a seen n-gram's continuation instead of the tail: the shortest
# match that counts.
_COPY_FIRST = {"ngram-first": 2, "ngram-loop": LOOP_NGRAM}
# N-gram searches read only the last NGRAM_WINDOW tokens of the sequence they search, so
# the fill costs a bounded amount per request and step however long the context grows
# (a full scan of a 100k-token context every step would cost more than it could gain).
# The bundled models stop at 1,024 tokens, so for them nothing changes.
NGRAM_WINDOW = 1024
# The kernel takes the policy as a small int (numba compiles no string compares).
_POLICY_CODES = {name: code for code, name in enumerate(FILL_POLICIES)}
_PROMPT, _REPEAT = _POLICY_CODES["prompt"], _POLICY_CODES["repeat"]


@numba.njit(cache=True)
def _latest_suffix_match(seq, lo, hi, max_n, min_n):
    """Where to copy from to continue ``seq[lo:hi]``: the index right after the latest
    earlier occurrence of its longest suffix n-gram, ``min_n <= n <= max_n``; -1 if none.

    An occurrence ``seq[j - n:j]`` counts when it lies inside the window
    (``j - n >= lo``) and ends before the suffix's last token (``j <= hi - 1``), so there
    is always at least one token to copy.
    """
    cap = min(max_n, hi - lo - 1)
    best_n = 0
    best_j = -1
    # One backward pass measures the suffix match length ending at every j once. Scanning
    # from the end, the first j to reach a new maximum length is the latest occurrence of
    # that n-gram, which is what a longest-n-first, latest-occurrence search returns. Stop
    # once no earlier j has room for a longer match, or the longest possible one is found.
    j = hi - 1
    while j - lo > best_n and best_n < cap:
        limit = min(cap, j - lo)
        n = 0
        while n < limit and seq[j - 1 - n] == seq[hi - 1 - n]:
            n += 1
        if n > best_n:
            best_n = n
            best_j = j
        j -= 1
    if best_n < min_n:
        return -1
    return best_j


@numba.njit(cache=True)
def _copy_cyclic(src, start, end, dst, d0, d1):
    """``dst[d0:d1] = src[start:end]`` repeated to length (``np.resize``'s tiling).

    A copy that runs into the end of its source would read its own output: the last
    period repeats, which is the cyclic tile.
    """
    period = end - start
    for t in range(d1 - d0):
        dst[d0 + t] = src[start + t % period]


@numba.njit(cache=True)
def _fill_rows(token_ids, num_tokens, tails, tail_lens, k, policy, copy_min_n, max_ngram,
               window, active, out, carried, copied):
    """The guess blocks of every active row (all policies but ``prompt``) into ``out``;
    ``carried[i]``: how many of row i's leading guesses are the tail or an n-gram copy,
    ``copied[i]``: whether it is a copy."""
    # The `ngram` search runs over context + tail, which live in two buffers: the window's
    # worth of both is copied here (a bounded copy; the context itself is read in place).
    seq = np.empty(min(window, token_ids.shape[1] + k), np.int64)
    for i in range(num_tokens.shape[0]):
        if not active[i]:
            continue
        n_ctx = num_tokens[i]
        ctx = token_ids[i]
        row = out[i]
        if copy_min_n > 0:
            start = _latest_suffix_match(ctx, max(0, n_ctx - window), n_ctx,
                                         max(max_ngram, copy_min_n), copy_min_n)
            if start >= 0:
                _copy_cyclic(ctx, start, n_ctx, row, 0, k)
                carried[i] = k
                copied[i] = True
                continue
            # No seen n-gram: the tail leads, topped up as `ngram` does.
        n_tail = min(tail_lens[i], k)
        carried[i] = n_tail
        copied[i] = False
        for t in range(n_tail):
            row[t] = tails[i, t]
        if n_tail == k:
            continue
        if policy == _REPEAT:
            last = 0
            if n_tail > 0:
                last = tails[i, n_tail - 1]
            elif n_ctx > 0:
                last = ctx[n_ctx - 1]
            row[n_tail:k] = last
            continue
        m = min(window, n_ctx + n_tail)  # the searched sequence: last m of context + tail
        from_tail = min(m, n_tail)
        from_ctx = m - from_tail
        for t in range(from_ctx):
            seq[t] = ctx[n_ctx - from_ctx + t]
        for t in range(from_tail):
            seq[from_ctx + t] = tails[i, n_tail - from_tail + t]
        start = _latest_suffix_match(seq, 0, m, max_ngram, 1)
        if start >= 0:
            _copy_cyclic(seq, start, m, row, n_tail, k)
        else:
            row[n_tail:k] = seq[m - 1] if m > 0 else 0


def _prompt_fill(context: np.ndarray, tail: np.ndarray, k: int,
                 num_prompt_tokens: int | None) -> np.ndarray:
    """The ``prompt`` policy's top-up of ``tail`` (numpy's seeded RNG: not in the kernel)."""
    need = k - len(tail)
    n_prompt = len(context) if num_prompt_tokens is None else num_prompt_tokens
    prompt = context[: max(1, n_prompt)] if len(context) else np.zeros(1, np.int64)
    # Seeded by prompt length and position so that a recomputed request (after
    # preemption) proposes the same tokens as before.
    rng = np.random.default_rng((len(prompt), len(context) + len(tail)))
    return prompt[rng.integers(0, len(prompt), size=need)]


def _policy_code(policy: str) -> int:
    try:
        return _POLICY_CODES[policy]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown fill policy {policy!r}; choose one of {FILL_POLICIES}"
        ) from None


def fill_guesses(
    token_ids: np.ndarray,
    num_tokens: np.ndarray,
    tails: np.ndarray,
    tail_lens: np.ndarray,
    k: int,
    policy: str,
    out: np.ndarray,
    *,
    active: np.ndarray | None = None,
    num_prompt_tokens: np.ndarray | None = None,
    window: int = NGRAM_WINDOW,
    max_ngram: int = MAX_NGRAM,
    carried: np.ndarray | None = None,
    copied: np.ndarray | None = None,
) -> np.ndarray:
    """Write the guess block of every row into ``out[i, :k]`` (one call per batch).

    Row ``i`` (of ``len(num_tokens)`` rows) has the context ``token_ids[i, :num_tokens[i]]``
    (any int dtype, read in place: pass vLLM's ``token_ids_cpu`` as it is) and the tail
    ``tails[i, :tail_lens[i]]`` (int64; at most ``k`` of it is used). ``out`` is an int64
    array of at least ``k`` columns; rows where ``active`` is False are left untouched.
    ``num_prompt_tokens`` (per row, default: the whole context) matters to ``prompt`` only.

    Each row equals :func:`fill_guess` on that row; n-gram searches read only the last
    ``window`` tokens of the sequence they search. Returns ``out``. If given, ``carried[i]``
    (int64) receives how many leading guesses of row i are carried over (the Jacobi tail,
    or a copy-first policy's n-gram copy) rather than made up by the fill, and
    ``copied[i]`` (bool) whether they are a copy: the adaptive policy learns from carried
    guesses only, and keeps tails and copies apart (:mod:`cllm_vllm.adaptive`).
    """
    code = _policy_code(policy)
    if k < 1:
        raise ValueError(f"block size must be >= 1, got {k}")
    if window < 1:
        raise ValueError(f"n-gram window must be >= 1, got {window}")
    num_tokens = np.ascontiguousarray(num_tokens, dtype=np.int64)
    tail_lens = np.ascontiguousarray(tail_lens, dtype=np.int64)
    tails = np.ascontiguousarray(tails, dtype=np.int64)  # small; one kernel specialisation
    rows = len(num_tokens)
    active = (np.ones(rows, dtype=bool) if active is None
              else np.ascontiguousarray(active, dtype=bool))
    if token_ids.ndim != 2 or token_ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be a 2-D int array, got {token_ids.dtype} "
                        f"{token_ids.shape}")
    if out.ndim != 2 or out.dtype != np.int64 or out.shape[1] < k:
        raise TypeError(f"out must be an int64 array of >= {k} columns, got {out.dtype} "
                        f"{out.shape}")
    if tails.ndim != 2 or tails.shape[1] < k:
        raise ValueError(f"tails must have >= {k} columns, got shape {tails.shape}")
    if min(token_ids.shape[0], tails.shape[0], out.shape[0]) < rows or len(tail_lens) < rows \
            or len(active) < rows:
        raise ValueError(f"every per-row argument needs >= {rows} rows")
    if rows == 0:
        return out
    if carried is None:
        carried = np.empty(rows, dtype=np.int64)
    if copied is None:
        copied = np.empty(rows, dtype=np.bool_)
    # The kernel does not check bounds: keep its reads inside the buffers.
    if num_tokens.min() < 0 or num_tokens.max() > token_ids.shape[1] or tail_lens.min() < 0:
        raise ValueError("num_tokens must lie in [0, token_ids.shape[1]], tail_lens >= 0")

    if code == _PROMPT:
        for i in np.flatnonzero(active[:rows]):
            tail = tails[i, : min(int(tail_lens[i]), k)]
            n_prompt = None if num_prompt_tokens is None else int(num_prompt_tokens[i])
            out[i, : len(tail)] = tail
            out[i, len(tail) : k] = _prompt_fill(
                token_ids[i, : num_tokens[i]], tail, k, n_prompt)
            carried[i] = len(tail)
            copied[i] = False
        return out
    _fill_rows(token_ids, num_tokens, tails, tail_lens, k, code, _COPY_FIRST.get(policy, 0),
               max_ngram, window, active, out, carried, copied)
    return out


def fill_guess(
    context: np.ndarray,
    tail: np.ndarray,
    k: int,
    policy: str = DEFAULT_FILL,
    num_prompt_tokens: int | None = None,
    max_ngram: int = MAX_NGRAM,
    window: int = NGRAM_WINDOW,
) -> np.ndarray:
    """Return a guess block of exactly ``k`` tokens (int64).

    ``context`` holds every exact token so far (prompt and output, the newest last);
    ``tail`` is the Jacobi-updated remainder of the previous block (may be empty). The
    block starts with ``tail[:k]``, except under a copy-first policy whose n-gram matched:
    then it is the copied continuation. One row of :func:`fill_guesses`.
    """
    if k < 1:
        raise ValueError(f"block size must be >= 1, got {k}")
    context = np.asarray(context)
    if context.dtype not in (np.int32, np.int64):
        context = context.astype(np.int64)
    context = np.ascontiguousarray(context)  # one kernel specialisation: C-contiguous rows
    tail = np.asarray(tail, dtype=np.int64)[:k]
    tails = np.zeros((1, k), dtype=np.int64)
    tails[0, : len(tail)] = tail
    out = np.empty((1, k), dtype=np.int64)
    fill_guesses(
        context[None, :], np.array([len(context)]), tails, np.array([len(tail)]), k, policy,
        out, num_prompt_tokens=None if num_prompt_tokens is None else np.array([num_prompt_tokens]),
        window=window, max_ngram=max_ngram,
    )
    return out[0]


def warm_up() -> float:
    """Compile (or load from numba's cache) the fill kernel for int32 and int64 token
    buffers; returns the seconds it took. Call it before timing anything (the proposer's
    constructor): the first call of each specialisation compiles otherwise (about a
    second each; loading them from the cache takes a fraction of that).

    Covered: C-contiguous ``token_ids`` (vLLM's ``token_ids_cpu`` is) and ``out``; a
    strided view of either compiles one more specialisation on first use.
    """
    t0 = time.perf_counter()
    k = 4
    for dtype in (np.int32, np.int64):
        ctx = np.array([[1, 2, 3, 1, 2, 3, 1, 2]], dtype=dtype)
        fill_guesses(ctx, np.array([ctx.shape[1]]), np.zeros((1, k), np.int64), np.array([1]),
                     k, DEFAULT_FILL, np.empty((1, k), np.int64))
    return time.perf_counter() - t0
