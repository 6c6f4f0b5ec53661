"""DB-MTL against the authors' code (LibMTL/weighting/DB_MTL.py, transcribed below) on task
gradient vectors, and the defining balance of its log-gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery._weighting import Needs
from gradsurgery.functional import dbmtl_weights
from gradsurgery.methods.dbmtl import DBMTL

from ._jacobians import random_jacobian
from ._loss_weighting import (
    assert_close,
    assert_resumes_bit_exactly,
    decide,
    positive_losses,
    random_losses,
    step,
)


class AuthorsDBMTL:
    """LibMTL's DB_MTL.backward on given per-task gradients ``jacobian`` of the losses: the
    gradients of ``log(losses + 1e-8)`` are ``jacobian / (losses + 1e-8)``."""

    def __init__(self, num_tasks, num_params, beta, beta_sigma):
        self.step = 0
        self.grad_buffer = torch.zeros(num_tasks, num_params, dtype=torch.float64)
        self.beta, self.beta_sigma = beta, beta_sigma

    def update(self, losses, jacobian):
        self.step += 1
        batch_grads = jacobian / (torch.tensor(losses, dtype=torch.float64)[:, None] + 1e-8)
        self.grad_buffer = batch_grads + (self.beta / self.step**self.beta_sigma) * (
            self.grad_buffer - batch_grads
        )
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        return sum(alpha[i] * self.grad_buffer[i] for i in range(len(losses)))


def run_ours(method, losses, jacobian):
    squared = (jacobian * jacobian).sum(1).tolist()
    weights = step(method, losses, squared_norms=tuple(squared))
    return torch.tensor(weights, dtype=torch.float64) @ jacobian


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize(("beta", "beta_sigma"), [(0.9, 0.0), (0.5, 0.5), (0.99, 1.0)])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_agrees_with_the_authors_when_the_gradients_stay(num_tasks, beta, beta_sigma, scale):
    """With the same gradients at every step, averaging the norms is averaging the vectors."""
    jacobian = scale * random_jacobian(num_tasks, seed=num_tasks)
    ours, theirs = (
        DBMTL(beta, beta_sigma),
        AuthorsDBMTL(num_tasks, jacobian.shape[1], beta, beta_sigma),
    )
    for losses in random_losses(6, num_tasks, seed=1):
        expected = theirs.update(losses, jacobian)
        torch.testing.assert_close(run_ours(ours, losses, jacobian), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_agrees_with_the_authors_without_averaging(num_tasks):
    """``beta = 0``: the update of every step is the authors', whatever the gradients do."""
    ours, theirs = DBMTL(beta=0.0), AuthorsDBMTL(num_tasks, 24, 0.0, 0.0)
    for t, losses in enumerate(random_losses(5, num_tasks, seed=2)):
        jacobian = random_jacobian(num_tasks, seed=100 + t)
        expected = theirs.update(losses, jacobian)
        torch.testing.assert_close(run_ours(ours, losses, jacobian), expected, rtol=1e-10, atol=0)


@given(
    positive_losses(max_tasks=8),
    st.lists(st.floats(1e-3, 1e3), min_size=8, max_size=8),
)
def test_every_log_gradient_is_rescaled_to_the_largest_norm(losses, norms):
    """The defining balance (``beta = 0``): every task's term ``w_i g_i`` has the largest
    log-gradient norm ``M = max_j ||g_j|| / L_j`` (times the authors' ``n_i / (n_i + 1e-8)``)."""
    norms = norms[: len(losses)]
    weights, _ = dbmtl_weights(losses, norms, beta=0.0)
    scaled = [w * n for w, n in zip(weights.tolist(), norms, strict=True)]
    log_norms = [n / (x + 1e-8) for n, x in zip(norms, losses, strict=True)]
    expected = [max(log_norms) * n / (n + 1e-8) for n in log_norms]
    assert_close(scaled, expected, rtol=1e-12)


@given(positive_losses(max_tasks=6, low=1e-2, high=1e3), st.floats(1e-2, 1e2))
def test_weights_scale_inversely_with_a_task_loss(losses, c):
    """Log-transformed losses: multiplying task 0's loss by c divides its weight by c (the
    norm of its log-gradient is unchanged when its gradient is multiplied by c too)."""
    norms = [1.0] * len(losses)
    weights, _ = dbmtl_weights(losses, norms, beta=0.0)
    scaled, _ = dbmtl_weights([c * losses[0], *losses[1:]], [c, *norms[1:]], beta=0.0)
    expected = [weights[0].item() / c, *weights[1:].tolist()]
    assert_close(scaled.tolist(), expected, rtol=1e-5)  # up to the 1e-8 added to the losses


def test_zero_gradients_give_zero_weights():
    weights, average = dbmtl_weights([1.0, 2.0], [0.0, 0.0])
    assert weights.tolist() == [0.0, 0.0] and average.tolist() == [0.0, 0.0]


def test_reads_the_norms_of_the_stats():
    method = DBMTL(beta=0.0)
    assert method.needs is Needs.NORMS
    weights = decide(method, [1.0, 2.0], squared_norms=(16.0, 1.0)).weights
    assert_close(weights, [1.0, 4.0], rtol=1e-7)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_refuses_a_loss_that_is_not_positive_and_changes_nothing(bad):
    method = DBMTL()
    step(method, [1.0, 1.0], squared_norms=(1.0, 1.0))
    before = method.state_dict()
    with pytest.raises(ValueError, match="positive losses"):
        decide(method, [1.0, bad], squared_norms=(1.0, 1.0))
    assert method.state_dict() == before


@pytest.mark.parametrize("kwargs", [{"beta": 1.0}, {"beta": -0.1}, {"beta_sigma": -1.0}])
def test_refuses_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        DBMTL(**kwargs)


def test_refuses_a_changed_task_count():
    method = DBMTL()
    step(method, [1.0, 1.0], squared_norms=(1.0, 1.0))
    with pytest.raises(ValueError, match="reset"):
        decide(method, [1.0, 1.0, 1.0], squared_norms=(1.0, 1.0, 1.0))


def test_resumes_bit_exactly():
    assert_resumes_bit_exactly(
        lambda: DBMTL(0.9, 0.5), random_losses(8, 3, seed=3), at=3, squared_norms=(4.0, 1.0, 9.0)
    )


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    method = DBMTL()
    step(method, [1.0, 2.0], squared_norms=(1.0, 1.0))
    before = method.state_dict()
    for state in ({}, {"step": -1, "norm_average": None}, {"step": 1, "norm_average": [-1.0, 0.0]}):
        with pytest.raises(ValueError):
            method.load_state_dict(state)
        assert method.state_dict() == before
    assert math.isfinite(before["norm_average"][0])


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_a_zero_gradient_contributes_nothing_as_in_the_authors_code(beta):
    jacobian = random_jacobian(3, seed=9)
    jacobian[1] = 0.0
    ours, theirs = DBMTL(beta), AuthorsDBMTL(3, jacobian.shape[1], beta, 0.0)
    for losses in random_losses(4, 3, seed=4):
        expected = theirs.update(losses, jacobian)
        torch.testing.assert_close(run_ours(ours, losses, jacobian), expected, rtol=1e-10, atol=0)
        assert ours.state_dict()["norm_average"][1] == 0.0
