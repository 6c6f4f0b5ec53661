"""Methods with learned parameters (UW, IMTL-L): the wrapper gives them to the optimizer.

Their parameters are trained by the optimizer that trains the model, as in the papers; the
wrapper adds those the optimizer does not hold yet as one new parameter group (with the
optimizer's defaults), in both forms (``gs.UW(opt, num_tasks=T)`` and
``gs.MultiTaskOptimizer(opt, methods.UW(T))``). That the engine never sees them (float32
log-variances beside a float64 model, synchronized over two processes) is checked by the
contract suite's "uw-float32" entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs

T = 3


class Model(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6).to(dtype)
        self.head = nn.Linear(6, T).to(dtype)

    def losses(self, step: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        dtype = self.body.weight.dtype
        x = torch.randn(8, 4, generator=generator, dtype=dtype)
        y = torch.randn(8, T, generator=generator, dtype=dtype) * torch.arange(1, T + 1)
        out = self.head(torch.tanh(self.body(x)))
        return [(out[:, t] - y[:, t]).pow(2).mean() for t in range(T)]


def train(model: Model, opt: gs.MultiTaskOptimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        opt.backward(model.losses(step))
        opt.step()


def wrapper(form: str, name: str, model: Model, **method_options) -> gs.MultiTaskOptimizer:
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    if form == "class":
        return getattr(gs, name)(adam, num_tasks=T, **method_options)
    return gs.MultiTaskOptimizer(adam, getattr(gs.methods, name)(T, **method_options))


FORMS = [(form, name) for form in ("class", "method") for name in ("UW", "IMTLL")]


def learned(opt: gs.MultiTaskOptimizer) -> torch.nn.Parameter:
    (parameter,) = opt.method.parameters()
    return parameter


@pytest.mark.parametrize(("form", "name"), FORMS)
def test_the_wrapper_adds_the_learned_parameters_and_the_optimizer_steps_them(form, name):
    torch.manual_seed(0)
    model = Model()
    opt = wrapper(form, name, model, dtype=torch.float64)
    parameter = learned(opt)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["params"] == [parameter]
    assert opt.param_groups[1]["lr"] == 0.1  # the optimizer's defaults
    initial = parameter.detach().clone()
    train(model, opt, range(2))
    assert not torch.equal(parameter.detach(), initial)


@pytest.mark.parametrize("name", ["UW", "IMTLL"])
def test_parameters_the_optimizer_already_holds_are_left_in_their_group(name):
    model = Model()
    method = getattr(gs.methods, name)(T, dtype=torch.float64)
    adam = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": method.parameters(), "lr": 0.01}], lr=0.1
    )
    opt = gs.MultiTaskOptimizer(adam, method)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.01


@pytest.mark.parametrize(("form", "name"), FORMS)
def test_state_dict_round_trip_includes_the_learned_parameters(form, name):
    torch.manual_seed(0)
    model = Model()
    opt = wrapper(form, name, model, dtype=torch.float64)
    train(model, opt, range(3))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved["optimizer"]["param_groups"]) == 2  # with the learned parameters' group
    train(model, opt, range(3, 6))

    resumed_model = Model()
    resumed = wrapper(form, name, resumed_model, dtype=torch.float64)
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    torch.testing.assert_close(
        learned(resumed).detach(), saved["method"][next(iter(saved["method"]))], rtol=0, atol=0
    )
    train(resumed_model, resumed, range(3, 6))
    assert torch.equal(learned(resumed).detach(), learned(opt).detach())
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
