"""BatchPartitionEngine: one backward pass gives the same per-task Jacobian as autograd."""

from __future__ import annotations

import warnings
import weakref

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn

import gradsurgery as gs
from gradsurgery import _jacobian as jacobian_module
from gradsurgery._autograd import AutogradEngine, task_jacobian
from gradsurgery._jacobian import TaskJacobian
from tests._models import DEVICES


class Mixed(nn.Module):
    """Linear, Embedding, LayerNorm and Conv1d layers, a residual, and a bare parameter."""

    def __init__(self, num_tasks: int, sequence: bool) -> None:
        super().__init__()
        self.sequence = sequence
        self.embed = nn.Embedding(num_tasks + 1, 3, padding_idx=num_tasks)
        self.fc1 = nn.Linear(5 + 3, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.scale = nn.Parameter(torch.randn(16))  # no layer: slow path
        # Fast path on [N, 1, 16]; slow on the sequence model's [4N, 1, 16] (4N rows, not N).
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(16, 2)
        self.double()

    def forward(self, x, task_ids):
        if self.sequence:  # [N, L] tokens, [N, L, features]: per-sample sums over the sequence
            positions = torch.arange(x.shape[1], device=x.device)
            e = self.embed((task_ids[:, None] + positions) % self.embed.num_embeddings)
        else:
            e = self.embed(task_ids)
        h = torch.tanh(self.norm(self.fc1(torch.cat([x, e], dim=-1))))
        h = h + torch.relu(self.fc2(h)) * self.scale
        h = h + 0.5 * self.fc2(h)  # a second call of the same layer adds to the first
        flat = h.reshape(-1, 1, 16)
        h = h + self.conv(flat).mean(dim=1).reshape(h.shape)
        return self.head(h)


def losses_on_slices(out, y, sizes):
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    return [
        (out[a : a + n] - y[a : a + n]).pow(2).mean() * (t + 1)
        for t, (a, n) in enumerate(zip(starts, sizes, strict=True))
    ]


def data(sizes, sequence, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    shape = (n, 4, 5) if sequence else (n, 5)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 2, generator=generator, dtype=torch.float64)
    task_ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    task_ids[0] = len(sizes)  # one padding row: its embedding gradient must stay zero
    return x.to(device), y.to(device), task_ids.to(device)


def assert_same_task_gradients(actual: TaskJacobian, expected: TaskJacobian, seed: int) -> None:
    """Same matrix, and the same Gramians and combinations computed from it, to float64."""
    close = {"rtol": 1e-10, "atol": 1e-12}
    # Plain numbers: nothing in the Jacobian keeps the forward pass's graph alive.
    factors = [t for f in actual.factored.values() for t in (f.inputs, f.output_grads)]
    assert not any(t.requires_grad for t in [actual.dense, *factors])
    matrix = expected.matrix
    torch.testing.assert_close(actual.matrix, matrix, **close)
    assert np.array_equal(actual.reached, expected.reached)
    generator = torch.Generator().manual_seed(seed)
    num_tasks, num_params = expected.reached.shape
    mask = (torch.rand(num_params, generator=generator) < 0.5).numpy()
    columns = torch.from_numpy(np.repeat(mask, actual.numels)).to(matrix.device)
    torch.testing.assert_close(actual.gramian(), matrix @ matrix.T, **close)
    selected = matrix[:, columns]
    torch.testing.assert_close(actual.gramian(mask), selected @ selected.T, **close)
    torch.testing.assert_close(actual.squared_norms(mask), selected.square().sum(1), **close)
    torch.testing.assert_close(actual.squared_norms(), matrix.square().sum(1), **close)
    weights = torch.randn(num_tasks, generator=generator, dtype=torch.float64).to(matrix.device)
    torch.testing.assert_close(torch.cat(actual.combine(weights)), weights @ matrix, **close)
    per_param = torch.randn(num_params, num_tasks, generator=generator, dtype=torch.float64)
    per_param = per_param.to(matrix.device)
    expected_parts = [
        w @ block for w, block in zip(per_param, matrix.split(actual.numels, 1), strict=True)
    ]
    for part, expected_part in zip(actual.combine(per_param), expected_parts, strict=True):
        torch.testing.assert_close(part, expected_part, **close)
    assert actual.nonfinite_tasks() == []
    count = int(torch.randint(num_params + 1, (), generator=generator))
    leading = actual.leading(count)
    torch.testing.assert_close(leading.matrix, matrix[:, : sum(actual.numels[:count])], **close)
    assert np.array_equal(leading.reached, expected.reached[:, :count])


@pytest.mark.parametrize("device", DEVICES)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    equal=st.booleans(),
    sequence=st.booleans(),
    factored=st.sampled_from(["never", "always", "auto"]),
    seed=st.integers(0, 2**16),
)
def test_fast_engine_equals_autograd_to_float64_precision(
    sizes, equal, sequence, factored, seed, device
):
    if equal:
        sizes = [sizes[0]] * len(sizes)
    torch.manual_seed(seed)
    model = Mixed(len(sizes), sequence).to(device)
    x, y, task_ids = data(sizes, sequence, seed, device)
    params = list(model.parameters())

    expected = task_jacobian(losses_on_slices(model(x, task_ids), y, sizes), params)
    engine = gs.BatchPartitionEngine(model, factored=factored)
    with engine.record(sizes):
        out = model(x, task_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is sent to the slow path
        actual = engine.jacobian(losses_on_slices(out, y, sizes), params)

    if factored == "always":  # fc1, fc2 and head
        assert len(actual.factored) == 3
    assert_same_task_gradients(actual, expected, seed)


def test_reached_jacobian_finds_the_same_parameters_as_the_default_engine():
    # GradNorm's full Jacobian: W first, then every other parameter the losses reach, found by
    # the fast engine's own graph walk (the embedding's padding row and the unused parameter
    # below must not change that).
    sizes = [3, 2, 4]
    model = Mixed(len(sizes), sequence=False)
    model.unused = nn.Linear(2, 2).double()  # never called: not reached
    x, y, task_ids = data(sizes, sequence=False, seed=0)
    leading = [model.fc2.weight]

    expected_params, expected = AutogradEngine().reached_jacobian(
        losses_on_slices(model(x, task_ids), y, sizes), leading
    )
    engine = gs.BatchPartitionEngine(model)
    with engine.record(sizes):
        out = model(x, task_ids)
    params, actual = engine.reached_jacobian(losses_on_slices(out, y, sizes), leading)

    assert params[0] is model.fc2.weight
    assert {id(p) for p in params} == {id(p) for p in expected_params}
    assert all(p is not model.unused.weight for p in params)
    by_param = dict(zip(map(id, params), actual.matrix.split(actual.numels, 1), strict=True))
    for p, column in zip(expected_params, expected.matrix.split(expected.numels, 1), strict=True):
        torch.testing.assert_close(by_param[id(p)], column, rtol=1e-10, atol=1e-12)


def study_network():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4)
    ).double()


def study_losses(out, targets):
    return [(o - t).pow(2).mean() for o, t in zip(out.split(64), targets.split(64), strict=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factored", ["never", "always"])
def test_pcgrad_with_the_fast_engine_equals_the_default(factored, device):
    x = torch.randn(192, 8, dtype=torch.float64).to(device)
    targets = torch.randn(192, 4, dtype=torch.float64) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    targets = targets.to(device)
    slow_model, fast_model = study_network().to(device), study_network().to(device)
    slow = gs.PCGrad(torch.optim.Adam(slow_model.parameters(), lr=1e-3))
    engine = gs.BatchPartitionEngine(fast_model, factored=factored)
    fast = gs.PCGrad(torch.optim.Adam(fast_model.parameters(), lr=1e-3), engine=engine)
    for _ in range(3):
        slow.zero_grad()
        slow_info = slow.pc_backward(study_losses(slow_model(x), targets))
        slow.step()
        fast.zero_grad()
        with engine.record([64, 64, 64]):
            out = fast_model(x)
        fast_info = fast.pc_backward(study_losses(out, targets))
        fast.step()
        torch.testing.assert_close(fast_info.cosine, slow_info.cosine)
    for a, b in zip(slow_model.parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factored", ["never", "always"])
def test_gradnorm_with_the_fast_engine_equals_the_default(factored, device):
    x = torch.randn(192, 8, dtype=torch.float64).to(device)
    targets = torch.randn(192, 4, dtype=torch.float64).to(device)
    slow_model, fast_model = study_network().to(device), study_network().to(device)
    slow_opt = torch.optim.Adam(slow_model.parameters(), lr=1e-3)
    fast_opt = torch.optim.Adam(fast_model.parameters(), lr=1e-3)
    slow = gs.GradNorm(3, slow_model[2], lr=0.05)
    engine = gs.BatchPartitionEngine(fast_model, factored=factored)
    fast = gs.GradNorm(3, fast_model[2], lr=0.05, engine=engine)
    for step in range(4):
        scaled = targets * (1 + step)
        slow_opt.zero_grad()
        slow.backward(study_losses(slow_model(x), scaled))
        slow_opt.step()
        fast_opt.zero_grad()
        with engine.record([64, 64, 64]):
            out = fast_model(x)
        fast.backward(study_losses(out, scaled))
        fast_opt.step()
        torch.testing.assert_close(fast.weights, slow.weights, rtol=1e-10, atol=1e-12)
    for a, b in zip(slow_model.parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_call_outside_the_recording_sends_its_layer_to_the_slow_path():
    model = study_network()
    x = torch.randn(6, 8, dtype=torch.float64)
    engine = gs.BatchPartitionEngine(model)
    with engine.record([3, 3]):
        hidden = model[:2](x)
    out = model[2:](hidden)  # after the recording: not attributable to tasks
    losses = [out[:3].pow(2).mean(), out[3:].sum()]
    expected = task_jacobian(losses, list(model.parameters()), retain_graph=True)
    actual = engine.jacobian(losses, list(model.parameters()))
    torch.testing.assert_close(actual.matrix, expected.matrix)


def test_the_recording_ends_with_its_block_even_on_an_error():
    model = study_network()
    x = torch.randn(6, 8, dtype=torch.float64)
    engine = gs.BatchPartitionEngine(model)
    with pytest.raises(KeyError), engine.record([3, 3]):
        raise KeyError("the forward pass failed")
    out = model(x)  # after the failed block: not recorded
    with pytest.raises(RuntimeError, match="recorded no forward pass"):
        engine.jacobian([out[:3].sum(), out[3:].sum()], list(model.parameters()))


def test_reuse_overwrites_one_matrix_with_the_same_gradients_as_a_fresh_one():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).double()
    engine = gs.BatchPartitionEngine(model)
    params = list(model.parameters())
    matrices = []
    # The second step's losses skip the last layer: its stale gradients must not stay.
    for step in range(2):
        x = torch.randn(6, 5, dtype=torch.float64)
        with engine.record([2, 4]):
            hidden = model[:2](x)
            out = model[2](hidden)
        used = out if step == 0 else hidden
        losses = [used[:2].pow(2).sum(), used[2:].sin().sum()]
        expected = task_jacobian(losses, params, retain_graph=True)
        actual = engine.jacobian(losses, params, reuse=True)
        torch.testing.assert_close(actual.matrix, expected.matrix, rtol=1e-10, atol=1e-12)
        matrices.append(actual.matrix)
    assert matrices[0].data_ptr() == matrices[1].data_ptr()  # one matrix, written twice
    with engine.record([2, 4]):
        out = model(x)
    fresh = engine.jacobian([out[:2].sum(), out[2:].sum()], params)
    assert fresh.matrix.data_ptr() != matrices[1].data_ptr()  # the default allocates
    kept = weakref.ref(matrices[1])
    del matrices, actual
    engine.remove()
    assert kept() is None  # remove() frees the matrix kept for reuse


def test_verify_catches_a_loss_that_mixes_tasks():
    model = study_network()
    engine = gs.BatchPartitionEngine(model, verify=True)
    x = torch.randn(6, 8, dtype=torch.float64)
    with engine.record([3, 3]):
        out = model(x)
    mixing = [out[:4].pow(2).mean(), out[3:].pow(2).mean()]  # row 3 belongs to task 1
    with pytest.raises(RuntimeError, match="mixes samples"):
        engine.jacobian(mixing, list(model.parameters()))


def test_clear_errors():
    model = study_network()
    engine = gs.BatchPartitionEngine(model)
    x = torch.randn(6, 8, dtype=torch.float64)
    loss = model(x).sum()
    with pytest.raises(RuntimeError, match="recorded no forward pass"):
        engine.jacobian([loss, loss], list(model.parameters()))
    with engine.record([3, 3]):
        out = model(x)
    with pytest.raises(ValueError, match="3 losses for a batch recorded with 2 tasks"):
        engine.jacobian([out.sum()] * 3, list(model.parameters()))
    with pytest.raises(ValueError, match="task_sizes"), engine.record([3, 0]):
        pass
    with pytest.raises(ValueError, match="BatchNorm"):
        gs.BatchPartitionEngine(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_remove_detaches_the_hooks():
    model = study_network()
    engine = gs.BatchPartitionEngine(model)
    engine.remove()
    with engine.record([1]):
        model(torch.randn(1, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="recorded no forward pass"):
        engine.jacobian([model(torch.randn(1, 8, dtype=torch.float64)).sum()], [model[0].weight])


def test_auto_factors_wide_layers_with_few_rows_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2)
    )
    params = list(model.parameters())
    for rows_per_task, expected in [(4, {2}), (64, set())]:  # only the 512 x 512 weight
        engine = gs.BatchPartitionEngine(model)
        x = torch.randn(10 * rows_per_task, 8)
        with engine.record([rows_per_task] * 10):
            out = model(x)
        jacobian = engine.jacobian(list(out.sum(dim=1).reshape(10, -1).sum(dim=1)), params)
        assert set(jacobian.factored) == expected


def test_a_nan_gradient_in_a_factored_layer_names_its_task_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    engine = gs.BatchPartitionEngine(model, factored="always")
    optimizer = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    before = [p.detach().clone() for p in model.parameters()]
    with engine.record([3, 3]):
        out = model(torch.randn(6, 4, dtype=torch.float64))
    # sqrt at 0: a finite loss (0) whose gradient is NaN, in task 1 only.
    losses = [out[:3].pow(2).mean(), torch.sqrt((out[3:] - out[3:].detach()).pow(2)).sum()]
    with pytest.raises(gs.NonFiniteError, match="task\\(s\\) 1 "):
        optimizer.pc_backward(losses)
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


class Tied(nn.Module):
    """Ways a layer's recorded calls miss part of its parameters' gradient."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.embed = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.double()

    def forward(self, tokens):
        h = self.fc(self.embed(tokens))
        if self.case == "inplace-output":
            h.tanh_()  # D must be the gradient before tanh, not after
        if self.case == "inplace-input":
            e = self.embed(tokens)
            h = self.fc(e)
            e.mul_(2)  # the detached input the engine kept changes with it
        if self.case == "tied":  # the output projection reuses the embedding matrix
            return self.out(h) + h @ self.embed.weight[:3].T
        if self.case == "penalty":
            return self.out(h) + 0.1 * self.fc.weight.pow(2).sum()
        if self.case == "weight-as-input":  # a layer's parameter fed to another layer
            return self.out(h) + self.fc(self.out.weight).sum()
        return self.out(h)


@pytest.mark.parametrize(
    ("case", "slow"),
    [
        ("inplace-output", {"fc"}),
        ("tied", {"embed"}),
        ("penalty", {"fc"}),
        ("weight-as-input", {"out"}),
    ],
)
def test_a_parameter_used_outside_its_layer_takes_the_slow_path(case, slow):
    torch.manual_seed(0)
    model = Tied(case)
    tokens = torch.randint(5, (6,))
    sizes = [2, 4]
    params = list(model.parameters())
    expected = task_jacobian(losses_on_slices(model(tokens), torch.zeros(6, 3), sizes), params)
    engine = gs.BatchPartitionEngine(model)
    for step in range(2):  # warned once, then silent; right both times
        with engine.record(sizes):
            out = model(tokens)
        losses = losses_on_slices(out, torch.zeros(6, 3), sizes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = engine.jacobian(losses, params)
        messages = [str(w.message) for w in caught]
        if step == 0:
            assert len(messages) == 1 and all(name in messages[0] for name in slow)
        else:
            assert messages == []
        assert_same_task_gradients(actual, expected, seed=step)


def test_an_input_changed_in_place_after_the_call_takes_the_slow_path():
    torch.manual_seed(0)
    model = Tied("inplace-input")
    tokens = torch.randint(5, (6,))
    params = list(model.parameters())
    # Autograd itself refuses: the input was saved for the backward, then modified.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        task_jacobian(losses_on_slices(model(tokens), torch.zeros(6, 3), [3, 3]), params)
    engine = gs.BatchPartitionEngine(model)
    with engine.record([3, 3]):
        out = model(tokens)
    with pytest.warns(UserWarning, match="fc"), pytest.raises(RuntimeError, match="inplace"):
        engine.jacobian(losses_on_slices(out, torch.zeros(6, 3), [3, 3]), params)


@pytest.mark.parametrize("spread_max", [0, 1 << 30])
def test_per_parameter_combination_is_the_same_by_blocks_and_spread(monkeypatch, spread_max):
    # Small Jacobians spread the per-parameter weights over the columns (one product), large
    # ones take a product per parameter block: the same combination.
    monkeypatch.setattr(jacobian_module, "_SPREAD_MAX_ELEMENTS", spread_max)
    generator = torch.Generator().manual_seed(0)
    numels = [3, 1, 8, 2]
    matrix = torch.randn(4, sum(numels), generator=generator, dtype=torch.float64)
    per_param = torch.randn(len(numels), 4, generator=generator, dtype=torch.float64)
    parts = TaskJacobian(matrix, None, numels).combine(per_param)
    blocks = matrix.split(numels, dim=1)
    for part, w, block in zip(parts, per_param, blocks, strict=True):
        torch.testing.assert_close(part, w @ block, rtol=1e-12, atol=1e-12)
