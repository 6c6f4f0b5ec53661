"""GLS against torchjd's GeometricMean and LibMTL's formula, and the geometric mean's
homogeneity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.scalarization import GeometricMean

from gradsurgery._weighting import Needs
from gradsurgery.functional import gls_weights
from gradsurgery.methods.gls import GLS

from ._loss_weighting import (
    assert_close,
    assert_refusal_changes_nothing,
    decide,
    gradient_weights,
    positive_losses,
)


@given(positive_losses(max_tasks=10, low=1e-6, high=1e6))
def test_agrees_with_torchjd(losses):
    theirs = gradient_weights(GeometricMean(), losses)
    assert_close(decide(GLS(), losses).weights, theirs, rtol=1e-12)


@pytest.mark.parametrize("num_tasks", range(2, 11))
def test_agrees_with_libmtl_formula(num_tasks):
    """LibMTL's GLS (LibMTL/weighting/GLS.py): ``torch.pow(losses.prod(), 1. / task_num)``."""
    losses = [0.5 + 0.37 * i for i in range(num_tasks)]
    theirs = gradient_weights(lambda v: torch.pow(v.prod(), 1.0 / num_tasks), losses)
    assert_close(gls_weights(losses).tolist(), theirs, rtol=1e-12)


@given(positive_losses())
def test_the_weighted_losses_sum_to_the_geometric_mean(losses):
    """Euler: the geometric mean is homogeneous of degree one, so ``sum_i w_i L_i = GM``."""
    geometric_mean = math.exp(sum(math.log(x) for x in losses) / len(losses))
    weighted = sum(w * x for w, x in zip(gls_weights(losses).tolist(), losses, strict=True))
    assert weighted == pytest.approx(geometric_mean, rel=1e-12)


@given(positive_losses(max_tasks=6), st.floats(min_value=1e-3, max_value=1e3))
def test_weights_do_not_change_when_every_loss_is_scaled(losses, c):
    assert_close(
        gls_weights([c * x for x in losses]).tolist(), gls_weights(losses).tolist(), rtol=1e-12
    )


@given(positive_losses(max_tasks=6))
def test_permutation_equivariant(losses):
    order = list(reversed(range(len(losses))))
    permuted = gls_weights([losses[i] for i in order]).tolist()
    assert_close(permuted, [gls_weights(losses).tolist()[i] for i in order], rtol=1e-14)


def test_one_task_gets_weight_one():
    assert decide(GLS(), [3.0]).weights == [1.0]
    assert GLS.needs is Needs.LOSSES


def test_no_overflow_where_the_product_would():
    weights = gls_weights([1e200, 1e200, 1e-10]).tolist()  # the product is 1e390
    assert_close(weights, [1e130 / 3e200, 1e130 / 3e200, 1e130 / 3e-10], rtol=1e-12)


def test_a_weight_beyond_float64_is_refused():
    with pytest.raises(ValueError, match="overflows"):
        gls_weights([1e300, 1e300, 1e-300])


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_refuses_a_loss_that_is_not_positive(bad):
    assert_refusal_changes_nothing(GLS(), [1.0, bad], match="positive losses")
