"""torch.compile: the default engine trains a compiled model; the fast engine refuses one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs

SIZES = [4, 4, 4]


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    # Dynamo reuses a graph compiled for another instance of the same module class, and does
    # not guard on hooks: each test starts from an empty cache so that it sees what it asks for.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 8, generator=generator), torch.randn(12, 4, generator=generator)


def _losses(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [
        nn.functional.mse_loss(o, t) for o, t in zip(out.split(SIZES), y.split(SIZES), strict=True)
    ]


def _train(model: nn.Module, run: nn.Module, method: str) -> None:
    """Three steps of ``method`` on ``model``, whose forward pass is ``run``."""
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "pcgrad":
        optimizer = gs.PCGrad(optimizer, generator=torch.Generator().manual_seed(0))
        combine = optimizer.pc_backward
    else:
        combine = gs.GradNorm(len(SIZES), model[0], alpha=1.5, lr=0.05).backward
    for _ in range(3):
        optimizer.zero_grad()
        combine(_losses(run(x), y))
        optimizer.step()


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_the_default_engine_trains_a_compiled_model_as_the_eager_one(method):
    eager, compiled = _model(), _model()
    _train(eager, eager, method)
    _train(compiled, torch.compile(compiled, backend="aot_eager"), method)
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hooked", ["model", "compiled module"])
def test_the_fast_engine_refuses_a_compiled_forward_pass_and_changes_nothing(hooked):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    engine = gs.BatchPartitionEngine(model if hooked == "model" else compiled)
    optimizer = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch()
    with engine.record(SIZES):
        out = compiled(x)
    with pytest.raises(RuntimeError, match=r"cannot record a model run by torch\.compile"):
        optimizer.pc_backward(_losses(out, y))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with engine.record(SIZES):  # the uncompiled model still works with the same engine
        out = model(x)
    optimizer.pc_backward(_losses(out, y))
    assert all(p.grad is not None for p in model.parameters())


def test_the_fast_engine_says_so_when_a_cached_compiled_graph_skipped_its_hooks():
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _batch()
    compiled(x)  # compiled before the engine hooks the layers: the graph runs without hooks
    engine = gs.BatchPartitionEngine(model)
    optimizer = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    with engine.record(SIZES):
        out = compiled(x)
    with pytest.raises(RuntimeError, match=r"recorded no forward pass.*torch\.compile"):
        optimizer.pc_backward(_losses(out, y))
    assert all(p.grad is None for p in model.parameters())
