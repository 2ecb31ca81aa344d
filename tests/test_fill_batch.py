"""The batched fill kernel (:func:`cllm_vllm.fill.fill_guesses`) against the pure-numpy
``fill_guess`` it replaced, frozen here as the reference.

Fast: no vLLM engine, no model. Contexts are random with copies and loops built in so the
n-gram searches find matches of every length, and sometimes none.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cllm_vllm.fill import (
    _COPY_FIRST,
    FILL_POLICIES,
    MAX_NGRAM,
    NGRAM_WINDOW,
    fill_guess,
    fill_guesses,
    warm_up,
)

# --- the reference: cllm_vllm/fill.py as of d9df2ed (pure numpy, no window), frozen ------


def _reference_continuation_start(seq: np.ndarray, max_n: int, min_n: int = 1) -> int:
    """Index right after the latest earlier occurrence of the longest matching suffix, or -1."""
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        span = length - n
        mask = np.ones(span, dtype=bool)
        suffix = seq[length - n :]
        for t in range(n):
            mask &= seq[t : span + t] == suffix[t]
        hits = np.flatnonzero(mask)
        if hits.size:
            return int(hits[-1]) + n
    return -1


def _reference_fill_guess(context, tail, k, policy, num_prompt_tokens=None,
                          max_ngram=MAX_NGRAM):
    if k < 1:
        raise ValueError(f"block size must be >= 1, got {k}")
    context = np.asarray(context, dtype=np.int64)
    if policy in _COPY_FIRST:
        n = _COPY_FIRST[policy]
        start = _reference_continuation_start(context, max(max_ngram, n), min_n=n)
        if start >= 0:
            return np.resize(context[start:], k)
        policy = "ngram"
    tail = np.asarray(tail, dtype=np.int64)[:k]
    need = k - len(tail)
    if need == 0:
        return tail
    if policy == "ngram":
        seq = np.concatenate([context, tail])
        start = _reference_continuation_start(seq, max_ngram)
        if start < 0:
            extra = np.full(need, seq[-1] if len(seq) else 0, dtype=np.int64)
        else:
            extra = np.resize(seq[start:], need)
    elif policy == "prompt":
        n_prompt = len(context) if num_prompt_tokens is None else num_prompt_tokens
        prompt = context[: max(1, n_prompt)] if len(context) else np.zeros(1, np.int64)
        rng = np.random.default_rng((len(prompt), len(context) + len(tail)))
        extra = prompt[rng.integers(0, len(prompt), size=need)]
    elif policy == "repeat":
        last = tail[-1] if len(tail) else (context[-1] if len(context) else 0)
        extra = np.full(need, last, dtype=np.int64)
    else:
        raise ValueError(f"unknown fill policy {policy!r}; choose one of {FILL_POLICIES}")
    return np.concatenate([tail, extra])


# --- random batches ------------------------------------------------------------------------


def _random_context(rng: np.random.Generator, length: int) -> np.ndarray:
    """Random tokens with copies of earlier stretches and loops (a pattern repeated)."""
    vocab = int(rng.choice([2, 3, 8, 50, 30_000]))
    out: list[int] = []
    while len(out) < length:
        r = rng.random()
        if out and r < 0.3:  # copy an earlier stretch
            s = int(rng.integers(0, len(out)))
            out.extend(out[s : s + int(rng.integers(1, 12))])
        elif out and r < 0.45:  # a loop: the last p tokens, again and again
            p = int(rng.integers(1, min(8, len(out)) + 1))
            out.extend(out[-p:] * int(rng.integers(1, 5)))
        else:
            out.extend(rng.integers(0, vocab, size=int(rng.integers(1, 10))).tolist())
    return np.array(out[:length], dtype=np.int64)


def _random_batch(rng, rows, k, max_len, dtype=np.int32):
    """A vLLM-like token buffer (garbage past each row's length) and per-row tails."""
    lens = rng.integers(0, max_len + 1, size=rows)
    lens[: min(rows, 3)] = [0, 1, 2][: min(rows, 3)]  # the degenerate lengths, every batch
    width = int(lens.max()) + 5
    token_ids = rng.integers(-50, 50_000, size=(rows, width)).astype(dtype)
    contexts = []
    for i, n in enumerate(lens):
        ctx = _random_context(rng, int(n))
        token_ids[i, :n] = ctx
        contexts.append(ctx)
    # Tails of 0..k tokens, some longer than k (only k count), drawn from the context
    # half of the time so that they take part in matches.
    extra = 3
    tails = rng.integers(0, 50_000, size=(rows, k + extra)).astype(np.int64)
    tail_lens = rng.integers(0, k + extra + 1, size=rows)
    for i, ctx in enumerate(contexts):
        if len(ctx) and rng.random() < 0.5:
            tails[i] = rng.choice(ctx, size=k + extra)
    n_prompt = np.array([int(rng.integers(0, len(c) + 3)) for c in contexts])
    return token_ids, lens, contexts, tails, tail_lens, n_prompt


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warm_up()


@pytest.mark.parametrize("policy", FILL_POLICIES)
def test_rows_equal_the_reference(policy):
    for seed in range(40):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, 18))
        rows = int(rng.integers(1, 24))
        token_ids, lens, contexts, tails, tail_lens, n_prompt = _random_batch(rng, rows, k, 300)
        out = np.full((rows, k + 2), -7, dtype=np.int64)
        fill_guesses(token_ids, lens, tails, tail_lens, k, policy, out,
                     num_prompt_tokens=n_prompt)
        for i, ctx in enumerate(contexts):
            want = _reference_fill_guess(ctx, tails[i, : tail_lens[i]], k, policy,
                                         num_prompt_tokens=int(n_prompt[i]))
            assert out[i, :k].tolist() == want.tolist(), (seed, i, policy)
            assert (out[i, k:] == -7).all()  # nothing past k
            # fill_guess is one row of the same kernel
            one = fill_guess(ctx, tails[i, : tail_lens[i]], k, policy, int(n_prompt[i]))
            assert one.dtype == np.int64 and one.tolist() == want.tolist()


def _windowed_reference(ctx, tail, k, policy, window):
    """What a search confined to the last ``window`` tokens must give (window > k).

    Copy-first policies search the context's last ``window`` tokens and copy from there;
    ``ngram`` searches the last ``window`` of context + tail, which is the reference on the
    context's last ``window - len(tail)`` tokens. ``repeat`` and ``prompt`` do not search.
    """
    tail = tail[:k]
    if policy in _COPY_FIRST:
        n = _COPY_FIRST[policy]
        recent = ctx[-window:]
        start = _reference_continuation_start(recent, max(MAX_NGRAM, n), min_n=n)
        if start >= 0:
            return np.resize(recent[start:], k)
        policy = "ngram"
    if policy == "ngram":
        return _reference_fill_guess(ctx[-(window - len(tail)) :], tail, k, "ngram")
    return _reference_fill_guess(ctx, tail, k, policy)


@pytest.mark.parametrize("policy", FILL_POLICIES)
def test_searches_read_only_the_window(policy):
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        k = int(rng.integers(1, 18))
        window = int(rng.integers(k + 1, 64))
        rows = 12
        token_ids, lens, contexts, tails, tail_lens, n_prompt = _random_batch(rng, rows, k, 250)
        out = np.zeros((rows, k), dtype=np.int64)
        fill_guesses(token_ids, lens, tails, tail_lens, k, policy, out, window=window)
        for i, ctx in enumerate(contexts):
            want = _windowed_reference(ctx, tails[i, : tail_lens[i]], k, policy, window)
            assert out[i].tolist() == want.tolist(), (seed, i, policy, window)


@pytest.mark.parametrize("policy", ["ngram-first", "ngram-loop", "ngram"])
def test_a_match_outside_the_window_is_not_seen(policy):
    # The context ends in a 6-gram whose only earlier occurrence is at the very start;
    # everything between is distinct tokens.
    head = np.arange(1, 7)
    ctx = np.concatenate([head, [77, 78, 79], np.arange(1000, 1000 + 3000), head])
    no_tail = np.array([], np.int64)
    k = 5
    assert len(ctx) > NGRAM_WINDOW
    full = _reference_fill_guess(ctx, no_tail, k, policy)
    assert full.tolist() == [77, 78, 79, 1000, 1001]
    got = fill_guess(ctx, no_tail, k, policy)  # the default window
    assert got.tolist() == _windowed_reference(ctx, no_tail, k, policy, NGRAM_WINDOW).tolist()
    assert got.tolist() == [6] * k  # nothing seen: the last token repeats
    # ... and with a window that reaches back to the start, it is found again.
    assert fill_guess(ctx, no_tail, k, policy, window=len(ctx)).tolist() == full.tolist()


def test_window_boundary():
    # The searched sequence ends in a token seen once before, at index p; the window is its
    # last W tokens. An occurrence starting at the window's first token counts, one token
    # earlier does not.
    W, L = 10, 30
    for p_offset, found in ((0, True), (-1, False)):
        # copy-first: the context ends in the bigram (1, 2); the tail is not searched
        ctx = np.arange(100, 100 + L)
        p = L - W + p_offset
        ctx[p : p + 2] = ctx[-2:] = [1, 2]
        got = fill_guess(ctx, np.array([9, 9], np.int64), 4, "ngram-first", window=W)
        # (not found: the tail leads and `ngram` continues its repeated 9)
        assert got.tolist() == (np.resize(ctx[p + 2 :], 4).tolist() if found else [9, 9, 9, 9])
        # ngram: context + tail ends in the token 1 (the tail); the window spans both
        ctx = np.arange(100, 100 + L)
        seq_len = L + 1
        p = seq_len - W + p_offset
        ctx[p] = 1
        got = fill_guess(ctx, np.array([1], np.int64), 4, "ngram", window=W)
        assert got.tolist() == ([1] + ctx[p + 1 : p + 4].tolist() if found else [1, 1, 1, 1])


def test_int32_buffers_are_read_in_place():
    rng = np.random.default_rng(5)
    rows, k = 8, 16
    token_ids, lens, contexts, tails, tail_lens, _ = _random_batch(rng, rows, k, 200)
    out32 = np.zeros((rows, k), np.int64)
    out64 = np.zeros((rows, k), np.int64)
    fill_guesses(token_ids.astype(np.int32), lens, tails, tail_lens, k, "ngram-first", out32)
    fill_guesses(token_ids.astype(np.int64), lens, tails, tail_lens, k, "ngram-first", out64)
    assert out32.tolist() == out64.tolist()
    # A non-contiguous view (every other column of a wider buffer) works too.
    wide = np.zeros((rows, 2 * token_ids.shape[1]), np.int32)
    wide[:, ::2] = token_ids
    out_view = np.zeros((rows, k), np.int64)
    fill_guesses(wide[:, ::2], lens, tails, tail_lens, k, "ngram-first", out_view)
    assert out_view.tolist() == out32.tolist()
    # A big int32 buffer (vLLM's token_ids_cpu: max_num_seqs x max_model_len) is neither
    # copied nor converted: numpy allocates next to nothing during the call.
    big = np.zeros((64, 65_536), np.int32)  # 16 MiB
    big[:, :1000] = rng.integers(0, 50, size=(64, 1000))
    n_tok = np.full(64, 1000)
    out = np.zeros((64, k), np.int64)
    fill_guesses(big, n_tok, np.zeros((64, k), np.int64), np.zeros(64, np.int64), k,
                 "ngram-first", out)  # compiled already; measure a warm call
    tracemalloc.start()
    fill_guesses(big, n_tok, np.zeros((64, k), np.int64), np.zeros(64, np.int64), k,
                 "ngram-first", out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_inactive_rows_are_left_alone():
    rng = np.random.default_rng(9)
    rows, k = 20, 7
    token_ids, lens, contexts, tails, tail_lens, n_prompt = _random_batch(rng, rows, k, 100)
    active = rng.random(rows) < 0.5
    for policy in FILL_POLICIES:
        full = np.zeros((rows, k), np.int64)
        fill_guesses(token_ids, lens, tails, tail_lens, k, policy, full,
                     num_prompt_tokens=n_prompt)
        out = np.full((rows, k), -3, np.int64)
        fill_guesses(token_ids, lens, tails, tail_lens, k, policy, out, active=active,
                     num_prompt_tokens=n_prompt)
        assert (out[~active] == -3).all()
        assert out[active].tolist() == full[active].tolist()


def test_bad_arguments():
    ids = np.zeros((1, 4), np.int32)
    args = (ids, [4], np.zeros((1, 3), np.int64), [0])
    with pytest.raises(ValueError, match="'bogus'"):
        fill_guesses(*args, 3, "bogus", np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match="'bogus'"):
        fill_guess(np.array([1, 2]), np.array([], np.int64), 2, "bogus")
    with pytest.raises(ValueError, match="block size"):
        fill_guesses(*args, 0, "ngram", np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match="num_tokens"):
        fill_guesses(ids, [5], np.zeros((1, 3), np.int64), [0], 3, "ngram",
                     np.zeros((1, 3), np.int64))
    with pytest.raises(TypeError, match="out"):
        fill_guesses(*args, 3, "ngram", np.zeros((1, 3), np.int32))


def test_draft_room_leaves_room_for_the_bonus_token_and_skips_rows_without_a_sample():
    from cllm_vllm.proposer import _draft_room

    num_tokens_no_spec = np.array([10, 60, 62, 63, 64, 20, 0], dtype=np.int32)  # + padding
    num_new = np.array([1, 2, 1, 1, 1, 0])
    num_tokens, max_len = _draft_room(num_tokens_no_spec, num_new, 64, 8)
    assert num_tokens.dtype == np.int64 and num_tokens.tolist() == [10, 60, 62, 63, 64, 20]
    # The same as the numpy it replaces: min(room before max_model_len, k), 0 without a
    # sample (a prefill chunk).
    room = np.minimum(64 - num_tokens - 1, 8)
    assert max_len.tolist() == np.where(num_new > 0, np.maximum(room, 0), 0).tolist()
    assert max_len.tolist() == [8, 3, 1, 0, 0, 0]


def test_greedy_verify_is_one_jacobi_step_per_row():
    """The batched greedy verification (vLLM's sampler output layout) against
    cllm_vllm.jacobi.jacobi_step row by row, on random batches with some matching guesses."""
    from cllm_vllm.jacobi import jacobi_step
    from cllm_vllm.proposer import _greedy_verify

    rng = np.random.default_rng(7)
    for _ in range(200):
        num_draft = rng.integers(0, 6, size=rng.integers(1, 8))
        targets = [rng.integers(0, 4, size=d + 1) for d in num_draft]
        guesses = [np.where(rng.random(d) < 0.7, t[:d], rng.integers(0, 4, size=d))
                   for t, d in zip(targets, num_draft)]
        width = int(num_draft.max()) + 1
        out = _greedy_verify(np.concatenate(targets), np.concatenate(guesses).astype(np.int32),
                             num_draft, width)
        assert out.dtype == np.int32 and out.shape == (len(num_draft), width)
        for row, guess, target in zip(out, guesses, targets):
            exact = jacobi_step(guess, target).exact
            assert row.tolist() == exact.tolist() + [-1] * (width - len(exact))


def test_stopping_rows_are_those_vllm_will_finish():
    """A row leaves the batch when one of its new tokens is a stop token, or it reached
    max_tokens or the model's length (vLLM's check_stop); a row without a sample stays."""
    from cllm_vllm.proposer import _stopping_rows

    tokens = np.array([[5, 6, 7, 2, 0], [5, 6, 7, 8, 0], [1, 1, 9, 1, 0], [4, 4, 4, 4, 4],
                       [3, 2, 0, 0, 0]], dtype=np.int32)
    num_tokens = np.array([4, 4, 4, 5, 2])
    num_new = np.array([2, 1, 2, 1, 0])  # row 4: a prefill chunk, no sample
    prompt = np.array([2, 2, 1, 1, 1], dtype=np.int32)
    max_output = np.array([100, 2, 100, 100, 100])
    stops = np.array([[2, -1], [2, -1], [9, 2], [-1, -1], [2, -1]])
    # Row 0: EOS among its new tokens; row 1: max_tokens; row 2: a stop token id that is
    # not the last new token; row 3: the model's length (5).
    got = _stopping_rows(np.arange(5), tokens, num_tokens, num_new, prompt, max_output, stops, 5)
    assert got.tolist() == [True, True, True, True, False]
    got = _stopping_rows(np.arange(5), tokens, num_tokens, num_new, prompt,
                         np.full(5, 100), np.full((5, 2), -1), 1024)
    assert not got.any()
