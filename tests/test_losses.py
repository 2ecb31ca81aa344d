"""The CLLM losses against hand values and independent float64 formulas (scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax as np_log_softmax
from scipy.stats import entropy

from cllm_vllm.training.losses import (
    ar_loss,
    consistency_loss,
    token_divergence,
    unconverged_mask,
)


def _probs(logits: torch.Tensor) -> np.ndarray:
    return np.exp(np_log_softmax(logits.double().numpy(), axis=-1))


def test_forward_kl_by_hand():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p||q) = 1/2 ln(4/3)
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[math.log(3.0), 0.0]])
    got = token_divergence(teacher, student, "fkl")
    assert got.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # and reverse KL(q||p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    rkl = token_divergence(teacher, student, "rkl")
    assert rkl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


@pytest.mark.parametrize("distance", ["fkl", "rkl", "jsd"])
def test_divergences_match_scipy_in_float64(distance):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 5, 11, generator=g) * 2
    student = torch.randn(3, 5, 11, generator=g) * 2
    got = token_divergence(teacher, student, distance).double().numpy()
    p, q = _probs(teacher), _probs(student)
    if distance == "fkl":
        want = entropy(p, q, axis=-1)
    elif distance == "rkl":
        want = entropy(q, p, axis=-1)
    else:  # generalised JSD with beta = 1/2 is the ordinary JS divergence (natural log)
        want = jensenshannon(p, q, axis=-1) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_divergence_is_zero_for_equal_distributions_and_positive_otherwise():
    x = torch.randn(4, 7)
    for d in ("fkl", "rkl", "jsd"):
        assert token_divergence(x, x, d).abs().max() < 1e-6
        assert (token_divergence(x, x + torch.randn(4, 7), d) > 0).all()


def test_consistency_loss_sums_over_unmasked_positions_only():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 4, 9, generator=g)
    student = torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    loss = consistency_loss(student, teacher, mask)
    per_pos = token_divergence(teacher, student)
    assert loss[0].item() == pytest.approx((per_pos[0, [0, 1, 3]]).sum().item(), rel=1e-6)
    assert loss[1].item() == 0.0
    # Whatever sits at masked positions, on either side, does not change the loss.
    s2, t2 = student.clone(), teacher.clone()
    s2[0, 2] = 100 * torch.randn(9)
    t2[0, 2] = -100 * torch.randn(9)
    s2[1] = torch.randn(4, 9)
    assert torch.equal(consistency_loss(s2, t2, mask), loss)


def test_gradients_reach_the_student_only():
    teacher = torch.randn(2, 3, 6, requires_grad=True)
    student = torch.randn(2, 3, 6, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for d in ("fkl", "rkl", "jsd"):
        teacher.grad = student.grad = None
        consistency_loss(student, teacher, mask, d).sum().backward()
        assert teacher.grad is None
        assert student.grad is not None and student.grad.abs().sum() > 0


def test_ar_loss_by_formula_with_label_smoothing_and_mask():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, generator=g)
    labels = torch.randint(0, 8, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    eps = 0.1
    logp = np_log_softmax(logits.double().numpy(), axis=-1)
    for b in range(2):
        nll = -logp[b, np.arange(5), labels[b].numpy()]
        smooth = -logp[b].mean(-1)
        per_tok = (1 - eps) * nll + eps * smooth
        want = (per_tok * mask[b].numpy()).sum() / mask[b].sum().item()
        got = ar_loss(logits, labels, mask, eps)[b].item()
        assert got == pytest.approx(want, rel=1e-5)
    # masked positions do not count, whatever their label or logits
    labels2, logits2 = labels.clone(), logits.clone()
    labels2[0, 0], labels2[0, 4] = -100, 3
    logits2[0, 4] = 50.0
    torch.testing.assert_close(ar_loss(logits2, labels2, mask, eps),
                               ar_loss(logits, labels, mask, eps))
    assert ar_loss(logits, labels, torch.zeros_like(mask))[0].item() == 0.0


def test_unconverged_mask_starts_at_first_mismatch():
    fixed = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    state = torch.tensor([[5, 6, 0, 8], [0, 6, 7, 8], [5, 6, 7, 8]])
    assert unconverged_mask(state, fixed).tolist() == [
        [False, False, True, True],
        [True, True, True, True],
        [False, False, False, False],
    ]


def test_unknown_distance_is_named():
    with pytest.raises(ValueError, match="unknown distance 'l2'"):
        token_divergence(torch.zeros(1, 2), torch.zeros(1, 2), "l2")
