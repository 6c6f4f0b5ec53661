"""The default engine's vectorized option: one backward pass over the T task cotangents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery._autograd import AutogradEngine, batched_task_jacobian, task_jacobian


def _losses(model: nn.Module, heads: nn.ModuleList, double_back: nn.Module | None = None):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 6, 6)
    z = model(x)
    losses = [head(z).pow(2).mean() for head in heads]
    # Task 2 also reads a layer the others do not: its column block is reached by one task.
    return [*losses[:2], losses[2] + (double_back(z).sum() if double_back else 0.0)]


def _model():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(3))
    extra = nn.Linear(5, 1)
    return encoder, heads, extra


def test_equals_one_call_per_task():
    encoder, heads, extra = _model()
    params = [*encoder.parameters(), *heads.parameters(), *extra.parameters()]
    expected = task_jacobian(_losses(encoder, heads, extra), params)
    found = batched_task_jacobian(_losses(encoder, heads, extra), params)
    assert found is not None
    torch.testing.assert_close(found.matrix, expected.matrix)
    assert (found.reached == expected.reached).all()
    assert not found.reached.all()  # the test covers a parameter one task does not reach


class _NoVmap(torch.autograd.Function):
    """A custom function whose backward reads a value (``.item()``), which vmap refuses."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * (2.0 if grad.abs().sum().item() >= 0 else 0.0)


def test_falls_back_where_vmap_cannot_batch():
    encoder, heads, _ = _model()
    params = [*encoder.parameters(), *heads.parameters()]

    def losses():
        torch.manual_seed(1)
        z = _NoVmap.apply(encoder(torch.randn(8, 3, 6, 6)))
        return [head(z).pow(2).mean() for head in heads]

    assert batched_task_jacobian(losses(), params) is None
    engine = AutogradEngine(batched=True)
    found = engine.jacobian(losses(), params)
    assert engine.fell_back
    torch.testing.assert_close(found.matrix, task_jacobian(losses(), params).matrix)


def test_same_update_through_the_optimizer():
    grads = []
    for batched in (False, True):
        encoder, heads, extra = _model()
        model = nn.ModuleList([encoder, heads, extra])
        opt = gs.MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            gs.methods.PCGrad(generator=torch.Generator().manual_seed(0)),
            engine=AutogradEngine(batched=batched),
        )
        opt.backward(_losses(encoder, heads, extra))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_refuses_a_non_bool():
    with pytest.raises(TypeError, match="batched must be True or False"):
        AutogradEngine(batched="auto")  # type: ignore[arg-type]
