"""STCH against the authors' multi-task code (Xi-L/STCH, STCH_MTL/LibMTL/weighting/STCH.py,
transcribed below) over warm-up and training epochs, torchjd's STCH for the plain form, and the
smooth maximum's defining limits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.scalarization import STCH as TorchjdSTCH

from gradsurgery._weighting import Needs
from gradsurgery.functional import stch_log_weights, stch_weights
from gradsurgery.methods.stch import STCH

from ._loss_weighting import (
    assert_close,
    assert_refusal_changes_nothing,
    assert_resumes_bit_exactly,
    decide,
    gradient_weights,
    positive_losses,
    random_losses,
    step,
)


class AuthorsSTCH:
    """The authors' ``STCH.backward`` as a loss of the losses (``self.epoch`` set by the loop)."""

    def __init__(self, mu, warmup_epoch, task_num):
        self.mu, self.warmup_epoch, self.task_num = mu, warmup_epoch, task_num
        self.nadir_vector = None
        self.average_loss = 0.0
        self.average_loss_count = 0
        self.epoch = 0

    def loss(self, losses):
        if self.epoch < self.warmup_epoch:
            return torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
        if self.epoch == self.warmup_epoch:
            self.average_loss += losses.detach()
            self.average_loss_count += 1
            return torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
        if self.nadir_vector is None:
            self.nadir_vector = self.average_loss / self.average_loss_count
        losses = torch.log(losses / self.nadir_vector + 1e-20)
        max_term = torch.max(losses.data).detach()
        reg_losses = losses - max_term
        return self.mu * torch.log(torch.sum(torch.exp(reg_losses / self.mu))) * self.task_num


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_agrees_with_the_authors_over_epochs(num_tasks, mu, warmup_epochs):
    ours, theirs = STCH(mu, warmup_epochs=warmup_epochs), AuthorsSTCH(mu, warmup_epochs, num_tasks)
    rows = random_losses(6 * 3, num_tasks, seed=num_tasks)
    for epoch in range(6):
        theirs.epoch = epoch
        for losses in rows[epoch * 3 : (epoch + 1) * 3]:
            assert_close(step(ours, losses), gradient_weights(theirs.loss, losses), rtol=1e-10)
        ours.end_epoch()
    assert_close(ours.normalizer, theirs.nadir_vector.tolist(), rtol=1e-14)


@pytest.mark.parametrize("num_tasks", [2, 5, 10])
@pytest.mark.parametrize("mu", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_plain_form_agrees_with_torchjd(num_tasks, mu, scale):
    g = torch.Generator().manual_seed(num_tasks)
    values = (scale * torch.randn(num_tasks, generator=g, dtype=torch.float64)).tolist()
    preferences = torch.rand(num_tasks, generator=g, dtype=torch.float64)
    ideal = scale * torch.randn(num_tasks, generator=g, dtype=torch.float64)
    for kwargs, theirs in [
        ({}, TorchjdSTCH(mu)),
        (
            {"preferences": preferences.tolist(), "ideal_point": ideal.tolist()},
            TorchjdSTCH(mu, weights=preferences, reference=ideal),
        ),
    ]:
        method = STCH(mu, log_transform=False, **kwargs)
        assert_close(decide(method, values).weights, gradient_weights(theirs, values), rtol=1e-10)


@given(positive_losses(max_tasks=6))
def test_a_small_mu_weighs_the_worst_normalized_loss(losses):
    """As mu -> 0 the smooth maximum becomes the maximum: all of the softmax goes to the
    largest log-loss, whose weight tends to ``T / L_i``."""
    normalizer = [1.0] * len(losses)
    worst = max(range(len(losses)), key=losses.__getitem__)
    gap = sorted(math.log(x) for x in losses)
    if len(gap) > 1 and gap[-1] - gap[-2] < 1e-2:
        return  # a near tie: the limit is shared
    weights = stch_log_weights(losses, normalizer, mu=1e-4).tolist()
    expected = [0.0] * len(losses)
    expected[worst] = len(losses) / losses[worst]
    assert_close(weights, expected, rtol=1e-6, atol=1e-6 * max(expected))


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8), st.floats(0.01, 10.0))
def test_plain_weights_are_the_preferences_times_a_softmax(values, mu):
    weights = stch_weights(values, mu).tolist()
    assert all(w >= 0 for w in weights)
    assert math.fsum(weights) == pytest.approx(1 / len(values), rel=1e-12)


@given(positive_losses(max_tasks=6), st.floats(1e-3, 1e3))
def test_log_weights_scale_inversely_with_the_losses(losses, c):
    """Scaling every loss and its normalizer by c divides the weights by c."""
    normalizer = [2.0] * len(losses)
    weights = stch_log_weights(losses, normalizer).tolist()
    scaled = stch_log_weights([c * x for x in losses], [c * n for n in normalizer]).tolist()
    assert_close(scaled, [w / c for w in weights], rtol=1e-10)


def test_warm_up_descends_the_log_losses():
    method = STCH()
    assert method.needs is Needs.LOSSES and method.warmup_epochs == 4
    assert_close(step(method, [2.0, 0.5]), [0.5, 2.0], rtol=1e-15)


def test_the_normalizer_epoch_needs_a_step():
    method = STCH(warmup_epochs=0)
    with pytest.raises(RuntimeError, match="no step"):
        method.end_epoch()
    assert method.state_dict()["epoch"] == 0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_refuses_a_loss_that_is_not_positive_and_changes_nothing(bad):
    method = STCH(warmup_epochs=0)
    step(method, [1.0, 2.0])
    assert_refusal_changes_nothing(method, [1.0, bad], match="positive losses")


def test_plain_form_takes_any_sign():
    assert decide(STCH(log_transform=False), [-1.0, -1.0]).weights == [0.25, 0.25]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mu": 0.0},
        {"mu": float("inf")},
        {"warmup_epochs": -1},
        {"log_transform": False, "warmup_epochs": 2},
        {"preferences": [1.0, 1.0]},
    ],
)
def test_refuses_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        STCH(**kwargs)


def test_resumes_bit_exactly_across_the_normalizer_epoch():
    rows = random_losses(12, 3, seed=8)

    def run(method, rows, start):
        out = []
        for t, row in enumerate(rows, start):
            out.append(step(method, row))
            if t % 3 == 2:
                method.end_epoch()
        return out

    method = STCH(warmup_epochs=1)
    run(method, rows[:4], 0)  # inside the normalizer's epoch
    checkpoint = method.state_dict()
    expected = run(method, rows[4:], 4)
    restored = STCH(warmup_epochs=1)
    restored.load_state_dict(checkpoint)
    assert run(restored, rows[4:], 4) == expected
    assert_resumes_bit_exactly(lambda: STCH(log_transform=False), rows, at=5)


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    method = STCH(warmup_epochs=0)
    step(method, [1.0, 2.0])
    before = method.state_dict()
    for state in (
        {},
        {**before, "epoch": -1},
        {**before, "normalizer": [0.0, 1.0]},
        {**before, "loss_sum": [float("nan"), 1.0]},
    ):
        with pytest.raises(ValueError):
            method.load_state_dict(state)
        assert method.state_dict() == before
