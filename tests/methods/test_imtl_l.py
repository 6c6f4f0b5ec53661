"""IMTL-L against torchjd's IMTLL and the authors' loss transform (as LibMTL's IMTL writes it),
and its defining balance ``exp(s_i) L_i = 1``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from torchjd.scalarization import IMTLL as TorchjdIMTLL

from gradsurgery._weighting import Needs
from gradsurgery.functional import imtl_l_scale_gradient, imtl_l_weights, uw_weights
from gradsurgery.methods.imtl_l import IMTLL

from ._loss_weighting import (
    assert_close,
    assert_refusal_changes_nothing,
    decide,
    positive_losses,
    random_losses,
)


@pytest.mark.parametrize("num_tasks", [2, 5, 10])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_agrees_with_torchjd_over_training(num_tasks, scale):
    lr = 0.1 / max(1.0, scale)  # the log-scales' gradient grows with the losses
    ours = IMTLL(num_tasks, dtype=torch.float64)
    theirs = TorchjdIMTLL(num_tasks).double()
    optimizer = torch.optim.SGD(theirs.parameters(), lr=lr)
    for losses in random_losses(8, num_tasks, seed=num_tasks, scale=scale):
        values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        optimizer.zero_grad()
        theirs(values).backward()
        decision = decide(ours, losses)
        assert_close(decision.weights, values.grad.tolist(), rtol=1e-12)
        with torch.no_grad():
            ours.log_scales -= lr * torch.tensor(
                decision.parameter_grads[ours.log_scales], dtype=torch.float64
            )
        optimizer.step()
        assert_close(ours.log_scales.tolist(), theirs.log_scale.tolist(), rtol=1e-12, atol=1e-12)


def test_agrees_with_the_authors_transform():
    """LibMTL's IMTL (LibMTL/weighting/IMTL.py) transforms the losses as
    ``loss_scale.exp() * losses - loss_scale``, from ``loss_scale = 0``."""
    losses = [0.3, 2.0, 7.5]
    s = torch.tensor([0.25, -0.5, 0.0], dtype=torch.float64, requires_grad=True)
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    (s.exp() * values - s).sum().backward()
    method = IMTLL(3, dtype=torch.float64)
    method.load_state_dict({"log_scales": s.detach()})
    decision = decide(method, losses)
    assert_close(decision.weights, values.grad.tolist(), rtol=1e-14)
    assert_close(decision.parameter_grads[method.log_scales], s.grad.tolist(), rtol=1e-14)


@given(positive_losses())
def test_the_optimum_balances_the_scaled_losses(losses):
    """At ``s_i = -log L_i`` the scales are stationary and every scaled loss is 1."""
    s = [-math.log(x) for x in losses]
    assert_close(imtl_l_scale_gradient(losses, s).tolist(), [0.0] * len(losses), rtol=0, atol=1e-12)
    scaled = [w * x for w, x in zip(imtl_l_weights(s).tolist(), losses, strict=True)]
    assert_close(scaled, [1.0] * len(losses), rtol=1e-12)


@given(positive_losses(max_tasks=5))
def test_is_twice_uncertainty_weighting_at_the_negated_parameter(losses):
    s = [0.1 * i for i in range(len(losses))]
    twice_uw = [2 * w for w in uw_weights([-x for x in s]).tolist()]
    assert_close(imtl_l_weights(s).tolist(), twice_uw, rtol=1e-14)


def test_starts_as_the_plain_sum():
    method = IMTLL(3)
    assert method.needs is Needs.LOSSES
    assert decide(method, [1.0, 2.0, 3.0]).weights == [1.0, 1.0, 1.0]


def test_refuses_a_negative_loss_and_changes_nothing():
    assert_refusal_changes_nothing(IMTLL(2), [-1.0, 1.0], match="non-negative losses")


def test_diverged_scales_are_refused_with_a_clear_error():
    method = IMTLL(2, dtype=torch.float64)
    method.load_state_dict({"log_scales": torch.tensor([1e4, 0.0], dtype=torch.float64)})
    with pytest.raises(ValueError, match="diverged"):
        decide(method, [1.0, 1.0])
