"""The loss weightings through gradsurgery's optimizer wrapper: the model's ``.grad`` is the
gradient of the weighted sum of the losses, the learned parameters get their analytic gradient,
and a refused step changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods.dbmtl import DBMTL
from gradsurgery.methods.dwa import DWA
from gradsurgery.methods.famo import FAMO
from gradsurgery.methods.gls import GLS
from gradsurgery.methods.imtl_l import IMTLL
from gradsurgery.methods.rlw import RLW
from gradsurgery.methods.stch import STCH
from gradsurgery.methods.uw import UW

METHODS = {
    "uw": lambda: UW(3),
    "imtl_l": lambda: IMTLL(3),
    "dwa": lambda: DWA(window="step"),
    "rlw": lambda: RLW(generator=torch.Generator().manual_seed(0)),
    "gls": lambda: GLS(),
    "famo": lambda: FAMO(3),
    "dbmtl": lambda: DBMTL(),
    "stch": lambda: STCH(warmup_epochs=0),
}


def problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def losses(shift: float = 0.1):
        out = model(x)
        return [((out[:, i] - y[:, i]) ** 2).mean() + shift for i in range(3)]

    return model, losses


def wrap(method, model):
    learned = list(method.parameters()) if hasattr(method, "parameters") else []
    return gs.MultiTaskOptimizer(torch.optim.SGD([*model.parameters(), *learned], lr=0.05), method)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_model_gradient_is_that_of_the_weighted_sum(name):
    method = METHODS[name]()
    model, losses = problem()
    optimizer = wrap(method, model)
    for t in range(5):
        optimizer.zero_grad()
        info = optimizer.backward(losses())
        weights = [float(w) for w in info.weights]
        expected = torch.autograd.grad(
            sum(w * loss for w, loss in zip(weights, losses(), strict=True)),
            list(model.parameters()),
        )
        for parameter, grad in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-7)
        optimizer.step()
        if name == "stch" and t == 0:
            method.end_epoch()


def test_losses_of_different_dtypes_are_weighted_each_in_its_own():
    model, losses = problem()
    optimizer = wrap(GLS(), model)
    mixed = losses()
    mixed[1] = mixed[1].double()  # e.g. one task's loss computed in float64
    info = optimizer.backward(mixed)
    expected = torch.autograd.grad(
        sum(w * loss for w, loss in zip(info.weights, losses(), strict=True)),
        list(model.parameters()),
    )
    for parameter, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("name", "attribute"), [("uw", "log_variances"), ("imtl_l", "log_scales")])
def test_learned_parameters_get_their_analytic_gradient_and_are_stepped(name, attribute):
    method = METHODS[name]()
    model, losses = problem()
    optimizer = wrap(method, model)
    parameter = getattr(method, attribute)
    scalarized = {
        "uw": lambda s, v: (0.5 * torch.exp(-s) * v + 0.5 * s).sum(),
        "imtl_l": lambda s, v: (torch.exp(s) * v - s).sum(),
    }[name]
    for _ in range(3):
        optimizer.zero_grad()
        values = torch.stack([loss.detach() for loss in losses()])
        s = parameter.detach().clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(scalarized(s, values), s)
        optimizer.backward(losses())
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-6, atol=1e-7)
        before = parameter.detach().clone()
        optimizer.step()
        torch.testing.assert_close(parameter.detach(), before - 0.05 * expected)


@pytest.mark.parametrize("name", ["uw", "imtl_l", "dwa", "gls", "famo", "dbmtl", "stch"])
def test_a_negative_loss_is_refused_and_changes_nothing(name):
    method = METHODS[name]()
    model, losses = problem()
    optimizer = wrap(method, model)
    optimizer.zero_grad()
    optimizer.backward(losses())
    optimizer.step()
    optimizer.zero_grad()
    state = copy.deepcopy(method.state_dict())
    with pytest.raises(ValueError, match=r"non-negative|positive|lower bound"):
        optimizer.backward(losses(shift=-100.0))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert repr(method.state_dict()) == repr(state)
