"""FAMO against torchjd's FAMO and the authors' official class (transcribed below) over several
steps, in both update modes, and the properties of its weights and logit update."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torchjd.scalarization import FAMO as TorchjdFAMO

from gradsurgery._weighting import Needs
from gradsurgery.functional import famo_logit_gradient, famo_weights
from gradsurgery.methods.famo import FAMO

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


class AuthorsFAMO:
    """github.com/Cranial-XIX/FAMO, famo.py (class FAMO), in float64; the loss and the update
    as written there."""

    def __init__(self, n_tasks, gamma, w_lr):
        self.min_losses = torch.zeros(n_tasks, dtype=torch.float64)
        self.w = torch.zeros(n_tasks, dtype=torch.float64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D = losses - self.min_losses + 1e-8
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - (
            curr_loss - self.min_losses + 1e-8
        ).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def authors_weights(famo: AuthorsFAMO, losses) -> list[float]:
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(famo.get_weighted_loss(values), values)
    famo.prev_loss = famo.prev_loss.detach()
    return grad.tolist()


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize("gamma", [0.0, 1e-3, 1e-2])
def test_manual_updates_agree_with_the_authors(num_tasks, gamma):
    """The authors' experiments: step, recompute the losses on the same batch, update."""
    rows = random_losses(16, num_tasks, seed=num_tasks)
    ours, theirs = (
        FAMO(num_tasks, gamma=gamma, update="manual"),
        AuthorsFAMO(num_tasks, gamma, 0.025),
    )
    for before, after in zip(rows[::2], rows[1::2], strict=True):
        assert_close(step(ours, before), authors_weights(theirs, before), rtol=1e-12)
        ours.update(after)
        theirs.update(torch.tensor(after, dtype=torch.float64))
        assert_close(ours.logits, theirs.w.tolist(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("num_tasks", [2, 5])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_next_losses_agree_with_torchjd_fed_the_next_losses(num_tasks, scale):
    """The cheap variant is torchjd's FAMO with ``update`` fed the next step's losses."""
    ours, theirs = FAMO(num_tasks), TorchjdFAMO(num_tasks).double()
    for t, losses in enumerate(random_losses(10, num_tasks, seed=3, scale=scale)):
        if t:
            theirs.update(torch.tensor(losses, dtype=torch.float64))
        assert_close(step(ours, losses), gradient_weights(theirs, losses), rtol=1e-10)


def test_logits_agree_with_torchjd_in_float32():
    ours, theirs = FAMO(3, update="manual"), TorchjdFAMO(3)
    rows = random_losses(12, 3, seed=4)
    for before, after in zip(rows[::2], rows[1::2], strict=True):
        step(ours, before)
        theirs(torch.tensor(before))
        ours.update(after)
        theirs.update(torch.tensor(after))
    assert_close(ours.logits, theirs._w.tolist(), rtol=1e-5, atol=1e-7)


@given(positive_losses(max_tasks=8))
def test_weights_are_positive_and_sum_to_one(losses):
    logits = [0.3 * i - 1 for i in range(len(losses))]
    weights = famo_weights(losses, logits).tolist()
    assert all(w > 0 for w in weights)
    assert math.fsum(weights) == pytest.approx(1.0, rel=1e-12)


@given(positive_losses(max_tasks=8), positive_losses(max_tasks=8))
def test_the_logit_update_favours_the_task_whose_loss_fell_least(before, after):
    """Descending the logit gradient raises the weight of the task with the smallest fall of
    its log-loss and lowers that of the largest; the gradient sums to zero."""
    n = min(len(before), len(after))
    before, after = before[:n], after[:n]
    gradient = famo_logit_gradient([0.0] * n, before, after).tolist()
    assert abs(math.fsum(gradient)) <= 1e-12 * max(1.0, max(map(abs, gradient)))
    falls = [math.log(b + 1e-8) - math.log(a + 1e-8) for b, a in zip(before, after, strict=True)]
    least, most = falls.index(min(falls)), falls.index(max(falls))
    if falls[most] - falls[least] > 1e-9:
        assert gradient[least] < 0 < gradient[most]


def test_first_step_weighs_by_inverse_loss():
    method = FAMO(2)
    assert method.needs is Needs.LOSSES
    assert_close(step(method, [1.0, 3.0]), [0.75, 0.25], rtol=1e-7)
    assert method.weights == [0.5, 0.5]


def test_min_losses_shift_the_losses():
    method = FAMO(2, min_losses=[0.5, 0.0])
    assert_close(decide(method, [1.5, 3.0]).weights, [0.75, 0.25], rtol=1e-7)
    assert_refusal_changes_nothing(method, [0.4, 1.0], match="below its lower bound")


def test_refuses_a_negative_loss_and_changes_nothing():
    method = FAMO(2)
    step(method, [1.0, 1.0])
    assert_refusal_changes_nothing(method, [1.0, -1.0], match="below its lower bound")


def test_update_needs_manual_mode_and_a_step():
    with pytest.raises(RuntimeError, match="update='manual'"):
        FAMO(2).update([1.0, 1.0])
    method = FAMO(2, update="manual")
    with pytest.raises(RuntimeError, match="needs a step first"):
        method.update([1.0, 1.0])
    step(method, [1.0, 1.0])
    before = method.state_dict()
    with pytest.raises(ValueError):
        method.update([1.0, -1.0])
    assert method.state_dict() == before


@pytest.mark.parametrize(
    "kwargs",
    [{"w_lr": -1.0}, {"gamma": float("nan")}, {"update": "after"}, {"min_losses": [0.0]}],
)
def test_refuses_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        FAMO(2, **kwargs)


@pytest.mark.parametrize("update", ["next_losses", "manual"])
def test_resumes_bit_exactly(update):
    assert_resumes_bit_exactly(lambda: FAMO(3, update=update), random_losses(8, 3, seed=6), at=4)


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    method = FAMO(2)
    step(method, [1.0, 2.0])
    before = method.state_dict()
    for state in (
        {},
        {**before, "logits": [0.0]},
        {**before, "step": -1},
        {**before, "exp_avg_sq": [-1.0, 0.0]},
        {**before, "previous_losses": [1.0, float("nan")]},
    ):
        with pytest.raises(ValueError):
            method.load_state_dict(state)
        assert method.state_dict() == before
