"""The batch-partition engine reports which tasks reach each parameter as autograd does, and
survives a deep copy together with its model."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery._autograd import AutogradEngine

SIZES = [3, 2, 4]


class PerTaskHeads(nn.Module):
    """A shared trunk and one head per task; ``own_rows``: each head sees only its task's rows,
    else every head sees the whole batch and each loss reads its own slice."""

    def __init__(self, own_rows: bool) -> None:
        super().__init__()
        self.own_rows = own_rows
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in SIZES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        if self.own_rows:
            rows = features.split(SIZES)
            return [head(own) for head, own in zip(self.heads, rows, strict=True)]
        return [head(features) for head in self.heads]


def _losses(model: PerTaskHeads, outputs: list[torch.Tensor], y: torch.Tensor) -> list:
    targets = y.split(SIZES)
    parts = outputs if model.own_rows else [out.split(SIZES)[t] for t, out in enumerate(outputs)]
    return [(part - target).pow(2).mean() for part, target in zip(parts, targets, strict=True)]


def _pcgrad_grads(model: PerTaskHeads, engine, x, y) -> list[torch.Tensor]:
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    opt.zero_grad()
    if engine is None:
        outputs = model(x)
    else:
        with engine.record(task_sizes=SIZES):
            outputs = model(x)
    opt.pc_backward(_losses(model, outputs, y))
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("own_rows", [True, False], ids=["own-rows", "whole-batch"])
@pytest.mark.parametrize("verify", ["first", "never"])
@pytest.mark.parametrize("factored", ["never", "always"])
def test_pcgrad_gives_the_same_grad_with_either_engine_on_per_task_heads(
    own_rows, verify, factored
):
    torch.manual_seed(0)
    model = PerTaskHeads(own_rows).double()
    x = torch.randn(sum(SIZES), 5, dtype=torch.float64)
    y = torch.randn(sum(SIZES), 2, dtype=torch.float64)
    expected = _pcgrad_grads(model, None, x, y)
    engine = gs.BatchPartitionEngine(model, verify=verify, factored=factored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head on its own rows takes the slow path, said once
        actual = _pcgrad_grads(model, engine, x, y)
    for name_param, a, e in zip(model.named_parameters(), actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name_param[0])


@pytest.mark.parametrize("own_rows", [True, False], ids=["own-rows", "whole-batch"])
def test_the_engine_reports_the_reach_pattern_of_autograd(own_rows):
    torch.manual_seed(0)
    model = PerTaskHeads(own_rows)
    x, y = torch.randn(sum(SIZES), 5), torch.randn(sum(SIZES), 2)
    params = list(model.parameters())
    expected = AutogradEngine().jacobian(_losses(model, model(x), y), params).reached
    engine = gs.BatchPartitionEngine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with engine.record(task_sizes=SIZES):
            outputs = model(x)
        jacobian = engine.jacobian(_losses(model, outputs, y), params)
    actual = jacobian.reached
    if actual is None:  # every task reaches every parameter
        actual = expected | True
    assert (actual == expected).all(), (actual, expected)


def _step(model: nn.Module, opt: gs.PCGrad, engine: gs.BatchPartitionEngine, x, y) -> None:
    opt.zero_grad()
    with engine.record(task_sizes=SIZES):
        outputs = model(x)
    opt.pc_backward(_losses(model, outputs, y))


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("pending", [False, True], ids=["between-steps", "after-the-forward"])
@pytest.mark.parametrize("clone", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_a_deep_copy_with_its_model_runs_on_the_copied_model_without_a_warning(pending, clone):
    torch.manual_seed(0)
    model = PerTaskHeads(own_rows=False).double()
    x = torch.randn(sum(SIZES), 5, dtype=torch.float64)
    y = torch.randn(sum(SIZES), 2, dtype=torch.float64)
    engine = gs.BatchPartitionEngine(model)
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    _step(model, opt, engine, x, y)
    if pending:  # a recorded forward pass not yet differentiated: the copy starts afresh
        with engine.record(task_sizes=SIZES):
            model(x)
    model_copy, opt_copy = clone((model, opt))
    engine_copy = opt_copy.engine
    assert engine_copy.model is model_copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model_copy, opt_copy, engine_copy, x, y)
        _step(model, opt, engine, x, y)  # the original is untouched and still works
    for p, q in zip(model.parameters(), model_copy.parameters(), strict=True):
        assert p is not q
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12)
    # The copy's engine records the copied model's calls, not the original's.
    with engine_copy.record(task_sizes=SIZES):
        model_copy(x)
    assert set(engine_copy._recorder.calls) <= set(model_copy.modules())
    assert not engine._recorder.calls


class Wired(nn.Module):
    """A trunk, three heads on the whole batch and a second layer on head 0's output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in SIZES)
        self.top = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        outputs = {f"head{k}": head(features) for k, head in enumerate(self.heads)}
        outputs["top"] = self.top(outputs["head0"])
        outputs["trunk"] = features[:, :2]
        return outputs


# Which outputs each task's loss reads, on its own rows.
WIRINGS = [
    [["head0"], ["head1"], ["head2"]],
    [["head0", "head1"], ["head1"], ["head2"]],
    [["top"], ["head0"], ["head0", "head1", "head2"]],
    [["top"], ["trunk"], ["head2", "top"]],
    [["trunk"], ["trunk"], ["trunk"]],
    [["head1"], ["head1"], ["head1"]],
]


@pytest.mark.parametrize("wiring", WIRINGS, ids=lambda w: "-".join("+".join(t) for t in w))
@pytest.mark.parametrize("factored", ["never", "always"])
def test_each_task_reaches_what_its_loss_reads_as_with_autograd(wiring, factored):
    torch.manual_seed(1)
    model = Wired().double()
    x = torch.randn(sum(SIZES), 5, dtype=torch.float64)
    y = torch.randn(sum(SIZES), 2, dtype=torch.float64)

    def losses(outputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [
            sum((outputs[name].split(SIZES)[t] - y.split(SIZES)[t]).pow(2).mean() for name in names)
            for t, names in enumerate(wiring)
        ]

    params = list(model.parameters())
    expected = AutogradEngine().jacobian(losses(model(x)), params)
    engine = gs.BatchPartitionEngine(model, verify="always", factored=factored)
    with engine.record(task_sizes=SIZES):
        outputs = model(x)
    actual = engine.jacobian(losses(outputs), params)
    reached = actual.reached if actual.reached is not None else expected.reached | True
    assert (reached == expected.reached).all(), (actual.reached, expected.reached)
    gram_actual, gram_expected = actual.gramian(), expected.gramian()
    torch.testing.assert_close(gram_actual, gram_expected, rtol=1e-10, atol=1e-12)
