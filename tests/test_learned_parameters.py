"""Methods with learned parameters (UW, IMTL-L): the wrapper gives them to the optimizer.

Their parameters are trained by the optimizer that trains the model, as in the papers; the
wrapper adds those the optimizer does not hold yet with the optimizer's defaults (into the
first parameter group that has them, else as a new group), in both forms
(``gs.UW(opt, num_tasks=T)`` and ``gs.MultiTaskOptimizer(opt, methods.UW(T))``). The pipeline
checks their gradients (tensors or Python floats) like the model's before writing anything.
That the engine never sees them (float32
log-variances beside a float64 model, synchronized over two processes) is checked by the
contract suite's "uw-float32" entry.
"""

from __future__ import annotations

import copy
import math

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
    assert len(opt.param_groups) == 1  # the model's group has the optimizer's defaults
    assert opt.param_groups[0]["params"] == [*model.parameters(), parameter]
    initial = parameter.detach().clone()
    train(model, opt, range(2))
    assert not torch.equal(parameter.detach(), initial)


@pytest.mark.parametrize("name", ["UW", "IMTLL"])
def test_without_a_group_of_default_settings_they_get_a_group_of_their_own(name):
    model = Model()
    adam = torch.optim.Adam(
        [{"params": model.body.parameters(), "lr": 0.5}, {"params": model.head.parameters()}],
        lr=0.1,
        weight_decay=0.01,
    )
    adam.param_groups[1]["weight_decay"] = 0.0  # changed after construction
    method = getattr(gs.methods, name)(T, dtype=torch.float64)
    opt = gs.MultiTaskOptimizer(adam, method)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2, 1]
    assert opt.param_groups[2]["params"] == list(method.parameters())
    assert (opt.param_groups[2]["lr"], opt.param_groups[2]["weight_decay"]) == (0.1, 0.01)


def test_they_join_the_first_group_of_default_settings():
    model = Model()
    adam = torch.optim.SGD(
        [{"params": model.body.parameters(), "lr": 0.5}, {"params": model.head.parameters()}],
        lr=0.1,
    )
    opt = gs.UW(adam, num_tasks=T, dtype=torch.float64)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]
    assert opt.param_groups[1]["params"][-1] is learned(opt)


def test_an_optimizer_that_adds_groups_its_own_way_is_asked_to():
    added = []

    class Partitioned(torch.optim.Adam):  # as ZeroRedundancyOptimizer: it reorganizes
        def add_param_group(self, param_group):
            added.append(param_group)
            super().add_param_group(param_group)

    model = Model()
    opt = gs.UW(Partitioned(model.parameters(), lr=0.1), num_tasks=T, dtype=torch.float64)
    assert len(opt.param_groups) == 2
    assert added[-1]["params"] == [learned(opt)]


class _BadParameterGrads(gs.Method):
    """A loss weighting whose learned parameter gets a non-finite gradient."""

    needs = gs.Needs.LOSSES

    def __init__(self, as_floats: bool) -> None:
        self.scale = torch.nn.Parameter(torch.zeros(T, dtype=torch.float64))
        self.as_floats = as_floats

    def parameters(self):
        yield self.scale

    def decide(self, stats):
        grad = [0.0, math.nan, 1.0]
        if not self.as_floats:
            grad = torch.tensor(grad, dtype=torch.float64)
        return gs.Decision(weights=[1.0] * T, parameter_grads={self.scale: grad})


@pytest.mark.parametrize("as_floats", [True, False])
def test_a_non_finite_parameter_gradient_is_refused_and_nothing_is_written(as_floats):
    model = Model()
    opt = gs.MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), _BadParameterGrads(as_floats)
    )
    opt.zero_grad()
    with pytest.raises(gs.NonFiniteError, match="NaN or Inf"):
        opt.backward(model.losses(0))
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    skipping = gs.MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        _BadParameterGrads(as_floats),
        nonfinite="skip",
    )
    assert skipping.backward(model.losses(0)).skipped
    assert all(p.grad is None for g in skipping.param_groups for p in g["params"])


@pytest.mark.parametrize("as_floats", [True, False])
def test_parameter_gradients_are_written_in_the_parameters_dtype(as_floats):
    class Finite(_BadParameterGrads):
        def decide(self, stats):
            decision = super().decide(stats)
            grad = [0.5, -1.0, 2.0] if self.as_floats else torch.tensor([0.5, -1.0, 2.0])
            return gs.Decision(weights=decision.weights, parameter_grads={self.scale: grad})

    model = Model()
    method = Finite(as_floats)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
    opt.backward(model.losses(0))
    assert method.scale.grad.dtype == torch.float64
    assert method.scale.grad.tolist() == [0.5, -1.0, 2.0]


@pytest.mark.parametrize("as_floats", [True, False])
def test_a_parameter_gradient_of_the_wrong_size_is_refused_and_nothing_is_written(as_floats):
    class WrongSize(_BadParameterGrads):
        def decide(self, stats):
            grad = [0.5, -1.0] if self.as_floats else torch.tensor([0.5, -1.0])
            return gs.Decision(weights=[1.0] * T, parameter_grads={self.scale: grad})

    model = Model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), WrongSize(as_floats))
    with pytest.raises(ValueError, match="gradient of 2 values for a learned parameter of shape"):
        opt.backward(model.losses(0))
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])


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
    (group,) = saved["optimizer"]["param_groups"]
    assert len(group["params"]) == len(list(model.parameters())) + 1  # and the learned one
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
