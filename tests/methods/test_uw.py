"""Uncertainty weighting against torchjd's UW and LibMTL's formula, and its defining optimum."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from torchjd.scalarization import UW as TorchjdUW

from gradsurgery._weighting import Needs
from gradsurgery.functional import uw_log_variance_gradient, uw_weights
from gradsurgery.methods.uw import UW

from ._loss_weighting import (
    assert_close,
    assert_refusal_changes_nothing,
    assert_resumes_bit_exactly,
    decide,
    gradient_weights,
    positive_losses,
    random_losses,
)


def sgd_step(method: UW, losses, lr: float) -> list[float]:
    """One step of the method with its log-variances under plain SGD, as the pipeline and the
    user's optimizer run it: ``.grad`` from the decision, then ``s -= lr * grad``."""
    decision = decide(method, losses)
    (grad,) = decision.parameter_grads.values()
    with torch.no_grad():
        method.log_variances -= lr * torch.tensor(grad, dtype=method.log_variances.dtype)
    return list(decision.weights)


@pytest.mark.parametrize("num_tasks", [2, 3, 7, 10])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_agrees_with_torchjd_over_training(num_tasks, scale):
    ours = UW(num_tasks, dtype=torch.float64)
    theirs = TorchjdUW(num_tasks).double()
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for losses in random_losses(8, num_tasks, seed=num_tasks, scale=scale):
        values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        optimizer.zero_grad()
        theirs(values).backward()
        expected_weights = values.grad.tolist()
        optimizer.step()
        assert_close(sgd_step(ours, losses, lr=0.1), expected_weights, rtol=1e-12)
        assert_close(ours.log_variances.tolist(), theirs.log_var.tolist(), rtol=1e-12, atol=1e-12)


def test_agrees_with_libmtl_formula():
    """LibMTL's ``UW.backward`` (LibMTL/weighting/UW.py), which starts from ``s = -0.5``:
    ``loss = (losses / (2 * exp(s)) + s / 2).sum()``."""
    losses = [0.3, 2.0, 7.5]
    s = torch.tensor([-0.5] * 3, dtype=torch.float64, requires_grad=True)
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    (values / (2 * s.exp()) + s / 2).sum().backward()
    decision = decide(UW(3, initial_log_variance=-0.5, dtype=torch.float64), losses)
    assert_close(decision.weights, values.grad.tolist(), rtol=1e-14)
    assert_close(next(iter(decision.parameter_grads.values())), s.grad.tolist(), rtol=1e-14)


@given(positive_losses())
def test_the_optimal_log_variance_is_the_log_loss(losses):
    """The defining property: at ``s_i = log L_i`` the log-variances are stationary and every
    weighted loss ``w_i L_i`` is 1/2."""
    s = [math.log(x) for x in losses]
    assert_close(
        uw_log_variance_gradient(losses, s).tolist(), [0.0] * len(losses), rtol=0, atol=1e-12
    )
    weighted = [w * x for w, x in zip(uw_weights(s).tolist(), losses, strict=True)]
    assert_close(weighted, [0.5] * len(losses), rtol=1e-12)


@given(positive_losses(max_tasks=6))
def test_permutation_equivariant(losses):
    method = UW(len(losses), dtype=torch.float64)
    with torch.no_grad():
        method.log_variances.copy_(torch.linspace(-1, 1, len(losses)))
    order = list(reversed(range(len(losses))))
    permuted = UW(len(losses), dtype=torch.float64)
    with torch.no_grad():
        permuted.log_variances.copy_(method.log_variances[order])
    ours = decide(method, losses)
    theirs = decide(permuted, [losses[i] for i in order])
    assert list(theirs.weights) == [ours.weights[i] for i in order]


def test_needs_only_losses_and_returns_the_gradient_of_its_parameter():
    method = UW(2)
    assert method.needs is Needs.LOSSES
    assert list(method.parameters()) == [method.log_variances]
    decision = decide(method, [1.0, 4.0])
    assert decision.parameter_grads[method.log_variances] == [0.0, -1.5]
    assert list(gradient_weights(lambda v: TorchjdUW(2)(v.float()), [1.0, 4.0])) == decision.weights


def test_refuses_a_negative_loss_and_changes_nothing():
    method = UW(2)
    assert_refusal_changes_nothing(method, [1.0, -0.1], match="non-negative losses")


def test_refuses_a_different_number_of_tasks():
    with pytest.raises(ValueError, match="built for 2 tasks"):
        UW(2).check_num_tasks(3)


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_refuses_a_bad_task_count(bad):
    with pytest.raises(ValueError, match="num_tasks"):
        UW(bad)


def test_state_round_trip_keeps_the_parameter_object():
    method = UW(3)
    parameter = method.log_variances
    state = {"log_variances": torch.tensor([0.1, -0.2, 0.3])}
    method.load_state_dict(state)
    assert method.log_variances is parameter
    assert torch.equal(method.state_dict()["log_variances"], state["log_variances"])
    method.reset()
    assert method.log_variances.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"log_variances": torch.zeros(2)},
        {"log_variances": torch.tensor([0.0, 0.0, float("nan")])},
        {"log_variances": torch.zeros(3), "extra": 1},
    ],
)
def test_load_state_dict_refuses_bad_states_and_changes_nothing(state):
    method = UW(3)
    with torch.no_grad():
        method.log_variances.fill_(0.5)
    with pytest.raises(ValueError):
        method.load_state_dict(state)
    assert method.log_variances.tolist() == [0.5] * 3


def test_resumes_bit_exactly():
    def build():
        method = UW(3, dtype=torch.float64)
        with torch.no_grad():
            method.log_variances.copy_(torch.tensor([0.2, -0.1, 0.4]))
        return method

    assert_resumes_bit_exactly(build, random_losses(6, 3, seed=1), at=3)


def test_diverged_log_variances_are_refused_with_a_clear_error():
    method = UW(2, dtype=torch.float64)
    method.load_state_dict({"log_variances": torch.tensor([-1e4, 0.0], dtype=torch.float64)})
    with pytest.raises(ValueError, match="diverged"):
        decide(method, [1.0, 1.0])
