"""BatchPartitionEngine: a parameter only one task's loss reaches takes the single backward.

A per-task head applied to its task's rows only cannot be attributed by batch rows, but it
needs no attribution: the single backward pass's gradient of its parameters is its task's
gradient, every other task's is zero. Which task reaches it comes from the autograd graph.
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn

import gradsurgery as gs
import gradsurgery._partition.engine as engine_module
from gradsurgery._autograd import task_jacobian
from tests._models import DEVICES


class Gate(nn.Module):
    """A layer the engine has no formula for: ``tanh(x * scale) @ mix``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features))
        self.mix = nn.Parameter(torch.randn(features, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale) @ self.mix


def make_head(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(6, 2)
    if kind == "conv":  # reads the features as a 1-channel signal of length 6
        return nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 6), nn.Flatten())
    return Gate(6, 2)


class Heads(nn.Module):
    """A shared trunk (a convolution and a linear layer, on the fast path) and one head per
    task applied to its task's rows only; ``shared_by``: tasks that use the same head."""

    def __init__(
        self, kinds: list[str], shared_by: tuple[int, ...] = (), whole_batch: bool = False
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(10, 6), nn.Tanh()
        )
        self.heads = nn.ModuleList(make_head(kind) for kind in kinds)
        self.shared_by = shared_by
        self.whole_batch = whole_batch  # each head on every row, its task's loss on its own

    def forward(self, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        features = self.trunk(x.unsqueeze(1))
        heads = [
            self.heads[self.shared_by[0]] if t in self.shared_by else head
            for t, head in enumerate(self.heads)
        ]
        if self.whole_batch:
            return [head(features).split(sizes)[t] for t, head in enumerate(heads)]
        return [head(own) for head, own in zip(heads, features.split(sizes), strict=True)]


def per_task_losses(outputs: list[torch.Tensor], y: torch.Tensor, sizes: list[int]) -> list:
    return [
        (out - target).pow(2).mean() * (t + 1)
        for t, (out, target) in enumerate(zip(outputs, y.split(sizes), strict=True))
    ]


class PerTaskCalls:
    """Records the parameters the engine asks per-task autograd for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked: set[int] = set()

        def spy(losses, params, **options):
            self.asked.update(map(id, params))
            return task_jacobian(losses, params, **options)

        monkeypatch.setattr(engine_module, "task_jacobian", spy)


def run(model: Heads, engine: gs.BatchPartitionEngine, x, y, sizes):
    with engine.record(sizes):
        outputs = model(x, sizes)
    params = list(model.parameters())
    return params, engine.jacobian(per_task_losses(outputs, y, sizes), params)


def expected_jacobian(model: Heads, x, y, sizes):
    return task_jacobian(per_task_losses(model(x, sizes), y, sizes), list(model.parameters()))


def assert_same(actual, expected, dtype: torch.dtype) -> None:
    close = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(actual.matrix, expected.matrix, **close)
    assert np.array_equal(actual.reached, expected.reached)


@pytest.mark.parametrize("device", DEVICES)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    equal=st.booleans(),
    kinds=st.lists(st.sampled_from(["linear", "conv", "custom"]), min_size=4, max_size=4),
    whole_batch=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    verify=st.sampled_from(["first", "never"]),
    seed=st.integers(0, 2**16),
)
def test_per_task_heads_take_the_single_backward_and_equal_autograd(
    sizes, equal, kinds, whole_batch, dtype, verify, seed, device
):
    if equal:  # the heads' rows then say nothing about their task
        sizes = [sizes[0]] * len(sizes)
    torch.manual_seed(seed)
    model = Heads(kinds[: len(sizes)], whole_batch=whole_batch).to(device, dtype)
    x = torch.randn(sum(sizes), 5, dtype=dtype).to(device)
    y = torch.randn(sum(sizes), 2, dtype=dtype).to(device)
    expected = expected_jacobian(model, x, y, sizes)
    engine = gs.BatchPartitionEngine(model, verify=verify)
    with pytest.MonkeyPatch.context() as patch:
        calls = PerTaskCalls(patch)
        _, actual = run(model, engine, x, y, sizes)
    assert calls.asked == set()  # no parameter was differentiated per task
    assert engine.slow_layers() == {}
    assert_same(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv", "custom"])
@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 4, 3]], ids=["equal", "unequal"])
def test_a_head_two_tasks_reach_stays_on_the_per_task_path(sizes, kind, dtype):
    torch.manual_seed(0)
    model = Heads([kind] * 3, shared_by=(0, 2)).to(dtype)  # tasks 0 and 2 share head 0
    x = torch.randn(sum(sizes), 5, dtype=dtype)
    y = torch.randn(sum(sizes), 2, dtype=dtype)
    expected = expected_jacobian(model, x, y, sizes)
    engine = gs.BatchPartitionEngine(model)
    with pytest.MonkeyPatch.context() as patch:
        calls = PerTaskCalls(patch)
        params, actual = run(model, engine, x, y, sizes)
    # Head 2, unused, is reached by no task: it keeps the per-task path too (zero columns).
    unused = list(model.heads[2].parameters())
    assert calls.asked == {id(p) for p in [*model.heads[0].parameters(), *unused]}
    slow = {"linear": {"heads.0"}, "conv": {"heads.0.1"}, "custom": set()}[kind]
    assert set(engine.slow_layers()) == slow
    assert_same(actual, expected, dtype)
    columns = [k for k, p in enumerate(params) if any(p is q for q in unused)]
    assert not actual.reached[:, columns].any()


def test_a_head_whose_weight_a_second_task_penalizes_stays_on_the_per_task_path(monkeypatch):
    sizes = [2, 3]
    torch.manual_seed(1)
    model = Heads(["linear", "linear"]).double()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    engine = gs.BatchPartitionEngine(model)
    calls = PerTaskCalls(monkeypatch)
    with engine.record(sizes):
        outputs = model(x, sizes)
    losses = per_task_losses(outputs, y, sizes)
    losses[1] = losses[1] + 0.1 * model.heads[0].weight.square().sum()
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="heads.0: a parameter is also used outside"):
        actual = engine.jacobian(losses, params)
    assert calls.asked == {id(model.heads[0].weight)}
    outputs = model(x, sizes)
    losses = per_task_losses(outputs, y, sizes)
    losses[1] = losses[1] + 0.1 * model.heads[0].weight.square().sum()
    assert_same(actual, task_jacobian(losses, params), torch.float64)


def wrong_task(monkeypatch: pytest.MonkeyPatch, sizes: list[int]) -> None:
    """Make the engine credit each sole parameter to the next task."""
    right = engine_module.sole_tasks

    def shifted(losses, params, columns):
        return {k: (t + 1) % len(sizes) for k, t in right(losses, params, columns).items()}

    monkeypatch.setattr(engine_module, "sole_tasks", shifted)


@pytest.mark.parametrize("sizes", [[3, 3], [2, 4]], ids=["equal", "unequal"])
def test_verify_catches_a_wrong_attribution_of_a_sole_parameter(monkeypatch, sizes):
    torch.manual_seed(2)
    model = Heads(["custom", "linear"])
    x, y = torch.randn(sum(sizes), 5), torch.randn(sum(sizes), 2)
    wrong_task(monkeypatch, sizes)
    with pytest.raises(RuntimeError, match=r"disagrees with per-task autograd on heads\.0\.scale"):
        run(model, gs.BatchPartitionEngine(model), x, y, sizes)
    # Unchecked, the wrong rows go through: the check is what catches them.
    _, wrong = run(model, gs.BatchPartitionEngine(model, verify="never"), x, y, sizes)
    assert not torch.equal(wrong.matrix, expected_jacobian(model, x, y, sizes).matrix)


def test_a_new_attribution_is_checked_again_on_a_checked_plan(monkeypatch):
    sizes = [2, 3]
    torch.manual_seed(3)
    model = Heads(["linear", "conv"])
    x, y = torch.randn(5, 5), torch.randn(5, 2)
    engine = gs.BatchPartitionEngine(model)
    run(model, engine, x, y, sizes)  # checked: right
    wrong_task(monkeypatch, sizes)
    with pytest.raises(RuntimeError, match="disagrees with per-task autograd"):
        run(model, engine, x, y, sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_pcgrad_on_per_task_heads_equals_the_default_engine(device):
    sizes = [4, 4, 4]
    torch.manual_seed(4)
    x, y = torch.randn(12, 5).to(device), torch.randn(12, 2).to(device)
    grads = []
    for engine_kind in ("partition", "default"):
        torch.manual_seed(5)
        model = Heads(["linear", "conv", "custom"]).to(device)
        engine = gs.BatchPartitionEngine(model) if engine_kind == "partition" else None
        opt = gs.PCGrad(
            torch.optim.SGD(model.parameters(), lr=0.1),
            generator=torch.Generator().manual_seed(0),
            **({"engine": engine} if engine else {}),
        )
        for _ in range(2):
            opt.zero_grad()
            if engine is None:
                outputs = model(x, sizes)
            else:
                with engine.record(sizes):
                    outputs = model(x, sizes)
            opt.backward(per_task_losses(outputs, y, sizes))
            opt.step()
        grads.append([p.grad for p in model.parameters()])
    for fast, default in zip(*grads, strict=True):
        torch.testing.assert_close(fast, default)


def test_a_pattern_whose_walk_finds_no_sole_parameter_stops_walking_and_stays_exact(
    monkeypatch,
):
    sizes = [2, 3]
    torch.manual_seed(6)
    model = Heads(["custom", "custom"]).double()  # unrecorded heads: one plan for both steps
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    walks = []
    right = engine_module.sole_tasks

    def counted(*args):
        walks.append(1)
        return right(*args)

    monkeypatch.setattr(engine_module, "sole_tasks", counted)
    params = list(model.parameters())
    heads = {id(p) for p in model.heads.parameters()}

    def losses(crossed: bool) -> list:
        outputs = model(x, sizes)
        parts = per_task_losses(outputs, y, sizes)
        if crossed:  # a penalty on every head in every task's loss: no head has one task alone
            penalty = 0.1 * sum(p.square().sum() for p in model.heads.parameters())
            parts = [part + penalty for part in parts]
        return parts

    expected = {crossed: task_jacobian(losses(crossed), params) for crossed in (True, False)}
    calls = PerTaskCalls(monkeypatch)
    engine = gs.BatchPartitionEngine(model)
    for crossed in (True, False):
        calls.asked.clear()
        with engine.record(sizes):
            recorded = losses(crossed)
        actual = engine.jacobian(recorded, params)
        assert calls.asked == heads  # per task: crossed, then because the pattern stopped walking
        assert_same(actual, expected[crossed], torch.float64)
    assert len(walks) == 1
