"""The pure functions: one Jacobi step, fill policies."""

from __future__ import annotations

import numpy as np
import pytest

from cllm_vllm.fill import FILL_POLICIES, fill_guess
from cllm_vllm.jacobi import accepted_prefix_len, jacobi_step, split_verified


def test_accepted_prefix_len():
    assert accepted_prefix_len([1, 2, 3], [1, 2, 4, 9]) == 2
    assert accepted_prefix_len([5, 2], [1, 2, 3]) == 0
    assert accepted_prefix_len([1, 2], [1, 2, 3]) == 2
    assert accepted_prefix_len([], [7]) == 0


def test_jacobi_step_splits_exact_and_tail():
    step = jacobi_step(np.array([4, 5, 6, 7]), np.array([4, 5, 9, 8, 3]))
    assert step.num_accepted == 2
    assert step.exact.tolist() == [4, 5, 9]  # accepted guesses + the model's own token
    assert step.tail.tolist() == [8, 3]      # Jacobi update of the unaccepted positions
    full = jacobi_step(np.array([1, 2]), np.array([1, 2, 3]))
    assert full.num_accepted == 2 and full.exact.tolist() == [1, 2, 3] and full.tail.size == 0
    with pytest.raises(ValueError):
        jacobi_step(np.array([1, 2]), np.array([1]))


def test_split_verified_matches_step_for_greedy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = rng.integers(0, 3, size=6)
        a = rng.integers(0, 3, size=7)
        s = jacobi_step(g, a)
        t = split_verified(a, s.num_accepted)
        assert s.exact.tolist() == t.exact.tolist() and s.tail.tolist() == t.tail.tolist()
        assert len(s.exact) + len(s.tail) == 7


@pytest.mark.parametrize("policy", [p for p in FILL_POLICIES if p != "ngram-first"])
def test_fill_keeps_tail_and_size(policy):
    ctx = np.array([5, 6, 7, 5, 6, 7, 5])
    for k in (1, 3, 8):
        g = fill_guess(ctx, np.array([9, 9]), k, policy, num_prompt_tokens=4)
        assert len(g) == k and g[: min(k, 2)].tolist() == [9, 9][:k]
    with pytest.raises(ValueError):
        fill_guess(ctx, np.array([]), 0, policy)


def test_ngram_fill_continues_a_loop():
    ctx = np.array([1, 2, 3, 4, 2, 3, 4, 2])
    assert fill_guess(ctx, np.array([], dtype=int), 7, "ngram").tolist() == [3, 4, 2, 3, 4, 2, 3]
    # The tail takes part in the lookup.
    assert fill_guess(np.array([8, 1, 2, 8]), np.array([1]), 3, "ngram").tolist() == [1, 2, 8]


def test_ngram_fill_without_match_repeats_last():
    no_match = fill_guess(np.array([1, 2, 3]), np.array([], dtype=int), 3, "ngram")
    assert no_match.tolist() == [3, 3, 3]


def test_prompt_fill_draws_from_prompt_deterministically():
    ctx = np.array([10, 11, 12, 13, 50, 51])
    a = fill_guess(ctx, np.array([], dtype=int), 16, "prompt", num_prompt_tokens=4)
    b = fill_guess(ctx, np.array([], dtype=int), 16, "prompt", num_prompt_tokens=4)
    assert a.tolist() == b.tolist() and set(a.tolist()) <= {10, 11, 12, 13}


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown fill policy"):
        fill_guess(np.array([1]), np.array([]), 2, "nope")


def test_ngram_loop_needs_a_long_repeat_to_drop_the_tail():
    tail = np.array([9, 9])
    # a repeated bigram (2, 3): ngram-first copies what followed it, ngram-loop keeps the tail
    ctx = np.array([2, 3, 4, 5, 6, 7, 2, 3])
    assert fill_guess(ctx, tail, 3, "ngram-first").tolist() == [4, 5, 6]
    assert fill_guess(ctx, tail, 3, "ngram-loop").tolist()[:2] == [9, 9]
    # a repeated 6-gram is a loop: its continuation replaces the tail
    loop = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6])
    assert fill_guess(loop, tail, 4, "ngram-loop").tolist() == [7, 1, 2, 3]


def test_ngram_first_prefers_a_seen_ngram_over_the_tail():
    ctx = np.array([7, 1, 2, 3, 9, 1, 2])
    assert fill_guess(ctx, np.array([5, 5]), 4, "ngram-first").tolist() == [3, 9, 1, 2]
    # No bigram seen before: the Jacobi tail leads, n-gram fill tops it up.
    assert fill_guess(np.array([4, 5, 6]), np.array([8]), 3, "ngram-first").tolist() == [8, 8, 8]


def test_cpu_expand_replacement():
    import torch

    from cllm_vllm.patches.cpu_rejection_expand import expand_batch_to_tokens

    x = torch.tensor([0.0, 0.7, 1.3])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens(x, cu, 6, replace_from=0, replace_to=1)
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.7, 0.7, 1.3])
