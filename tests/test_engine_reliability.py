"""What the engines refuse or handle, so that no wrong gradient passes silently."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.nn.utils import parametrize

import gradsurgery as gs
from gradsurgery._autograd import task_jacobian
from gradsurgery._jacobian import FactoredGradients, TaskJacobian
from gradsurgery._partition import engine as engine_module
from tests._models import DEVICES, assert_same_snapshot, snapshot

CLOSE64 = {"rtol": 1e-10, "atol": 1e-12}


def sliced_losses(out, sizes, dim=0):
    """Task ``t``'s loss reads its own rows (along ``dim``) only."""
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    return [
        out.narrow(dim, a, n).pow(2).mean() * (t + 1)
        for t, (a, n) in enumerate(zip(starts, sizes, strict=True))
    ]


def assert_matches_autograd(engine, losses, params, **close):
    expected = task_jacobian(losses, params, retain_graph=True)
    actual = engine.jacobian(losses, params)
    torch.testing.assert_close(actual.matrix, expected.matrix, **(close or CLOSE64))


class Recurrent(nn.Module):
    """A time-major LSTM (the default layout) under a linear head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.encoder = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 2)
        self.double()

    def forward(self, x):
        return self.head(self.lstm(torch.tanh(self.encoder(x)))[0])


# ---------------------------------------------------------------------------------------------
# Time-major inputs: the batch is dim 1, and dim 0 (time) has the batch's size.


@pytest.mark.parametrize("verify", ["first", "never"])
def test_a_time_major_input_of_the_batch_size_never_gets_silently_wrong_gradients(verify):
    torch.manual_seed(0)
    model = Recurrent(batch_first=False)
    engine = gs.BatchPartitionEngine(model, verify=verify)
    sizes = [2, 4]
    x = torch.randn(6, 6, 3, dtype=torch.float64)  # [time, batch, features], time == batch
    with engine.record(sizes):
        out = model(x)
    losses = sliced_losses(out, sizes, dim=1)
    params = list(model.parameters())
    if verify == "never":  # the ambiguous layers take the slow path: exact
        assert_matches_autograd(engine, losses, params)
        assert set(engine.slow_layers()) == {"encoder", "head"}
        assert "more than one dimension" in engine.slow_layers()["head"]
    else:  # the check on the pattern's first step catches it, and says why
        with pytest.raises(RuntimeError, match=r"time-major.*head: its input \(6, 6, 5\)"):
            engine.jacobian(losses, params)


def test_a_batch_first_input_of_the_batch_size_is_confirmed_and_takes_the_fast_path():
    torch.manual_seed(0)
    model = Recurrent(batch_first=True)
    engine = gs.BatchPartitionEngine(model)
    sizes = [3, 3]
    for _ in range(2):  # the first step checks the pattern, the second one trusts it
        x = torch.randn(6, 6, 3, dtype=torch.float64)  # [batch, time, features]
        with engine.record(sizes):
            out = model(x)
        assert_matches_autograd(engine, sliced_losses(out, sizes), list(model.parameters()))
        assert engine.slow_layers() == {}


def test_an_unbatched_linear_input_takes_the_slow_path():
    # A 1-D input has no batch dimension, even when its length equals the batch size.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    engine = gs.BatchPartitionEngine(model, verify="never")
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with engine.record([2, 2]):
        out = model(v)
    assert_matches_autograd(engine, [out[:2].sum(), out[2:].pow(2).sum()], [model.weight])
    assert "no batch dimension" in engine.slow_layers()[""]


def test_a_transformer_layer_in_its_default_time_major_layout_is_refused_not_wrong():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0).double()
    engine = gs.BatchPartitionEngine(layer)
    x = torch.randn(4, 4, 8, dtype=torch.float64)  # [sequence, batch, features]
    with engine.record([2, 2]):
        out = layer(x)
    with pytest.raises(RuntimeError, match="time-major"):
        engine.jacobian(sliced_losses(out, [2, 2], dim=1), list(layer.parameters()))


# ---------------------------------------------------------------------------------------------
# Verification against autograd: on by default, once per recording pattern.


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_by_default_a_loss_that_mixes_tasks_raises_and_changes_nothing():
    model = mlp()
    engine = gs.BatchPartitionEngine(model)  # no option: the default checks
    optimizer = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    x = torch.randn(6, 5, dtype=torch.float64)
    with engine.record([3, 3]):
        out = model(x)
    batch_mean = out.mean()  # statistics over the whole batch read every task's rows
    losses = [(out[:3] - batch_mean).pow(2).mean(), (out[3:] - batch_mean).pow(2).mean()]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"mixes samples.*engine=None"):
        optimizer.pc_backward(losses)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def count_checks(monkeypatch):
    calls = []
    check = engine_module.BatchPartitionEngine._agrees

    def counting(*args, **kwargs):
        calls.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(engine_module.BatchPartitionEngine, "_agrees", counting)
    return calls


@pytest.mark.parametrize(("verify", "expected"), [("first", 2), ("always", 5), ("never", 0)])
def test_the_check_runs_on_the_first_step_of_each_pattern(monkeypatch, verify, expected):
    model = mlp()
    engine = gs.BatchPartitionEngine(model, verify=verify)
    calls = count_checks(monkeypatch)
    for step in range(5):
        sizes = [3, 3] if step < 3 else [2, 4]  # a new pattern at step 3
        with engine.record(sizes):
            out = model(torch.randn(6, 5, dtype=torch.float64))
        assert_matches_autograd(engine, sliced_losses(out, sizes), list(model.parameters()))
    assert len(calls) == expected


def test_a_nonfinite_first_step_leaves_the_pattern_unchecked(monkeypatch):
    model = mlp()
    engine = gs.BatchPartitionEngine(model)
    calls = count_checks(monkeypatch)
    for scale in (float("nan"), 1.0, 1.0):
        with engine.record([3, 3]):
            out = model(torch.randn(6, 5, dtype=torch.float64))
        engine.jacobian([out[:3].sum() * scale, out[3:].sum()], list(model.parameters()))
    assert len(calls) == 2  # the NaN step could not judge: the next one checks


@pytest.mark.parametrize(("recheck_every", "checked_steps"), [(3, [0, 3, 6]), (None, [0])])
def test_a_pattern_is_checked_again_every_recheck_every_steps(
    monkeypatch, recheck_every, checked_steps
):
    model = mlp()
    engine = gs.BatchPartitionEngine(model, recheck_every=recheck_every)
    calls = count_checks(monkeypatch)
    checked = []
    for step in range(8):
        with engine.record([3, 3]):
            out = model(torch.randn(6, 5, dtype=torch.float64))
        before = len(calls)
        assert_matches_autograd(engine, sliced_losses(out, [3, 3]), list(model.parameters()))
        if len(calls) > before:
            checked.append(step)
    assert checked == checked_steps


def test_a_loss_that_starts_mixing_tasks_later_is_caught_and_changes_nothing():
    # The first step of the pattern is clean and confirmed; from step 5 the loss reads a
    # statistic over the whole batch. The re-check (every 4 steps here) catches it at step 8.
    model = mlp()
    engine = gs.BatchPartitionEngine(model, recheck_every=4)
    optimizer = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    x = torch.randn(6, 5, dtype=torch.float64)
    for step in range(9):
        with engine.record([3, 3]):
            out = model(x)
        centre = out.mean() if step >= 5 else out[:3].mean().detach()
        losses = [(out[:3] - centre).pow(2).mean(), (out[3:] - centre).pow(2).mean()]
        optimizer.zero_grad()
        if step < 8:
            optimizer.pc_backward(losses)
            optimizer.step()
            continue
        before = snapshot(model, optimizer)  # the generator's state too
        with pytest.raises(RuntimeError, match="mixes samples"):
            optimizer.pc_backward(losses)
        assert_same_snapshot(before, snapshot(model, optimizer))


def test_a_nonfinite_recheck_step_is_checked_again_at_the_next_step(monkeypatch):
    model = mlp()
    engine = gs.BatchPartitionEngine(model, recheck_every=2)
    calls = count_checks(monkeypatch)
    for scale in (1.0, 1.0, float("nan"), 1.0, 1.0):  # checks: first, NaN recheck, its retry
        with engine.record([3, 3]):
            out = model(torch.randn(6, 5, dtype=torch.float64))
        engine.jacobian([out[:3].sum() * scale, out[3:].sum()], list(model.parameters()))
    assert len(calls) == 3


@pytest.mark.parametrize("recheck_every", [0, -1, True, 2.0, "100"])
def test_recheck_every_takes_a_positive_whole_number_or_none(recheck_every):
    with pytest.raises(ValueError, match="recheck_every must be a positive whole number"):
        gs.BatchPartitionEngine(mlp(), recheck_every=recheck_every)


def test_verify_takes_only_known_values():
    with pytest.raises(ValueError, match="verify must be 'first', 'always' or 'never'"):
        gs.BatchPartitionEngine(mlp(), verify="sometimes")
    assert gs.BatchPartitionEngine(mlp(), verify=True).verify == "always"
    assert gs.BatchPartitionEngine(mlp(), verify=False).verify == "never"


# ---------------------------------------------------------------------------------------------
# Layer options that change the gradient formula.


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_scale_grad_by_freq_is_exact(padding_idx):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 3, padding_idx=padding_idx, scale_grad_by_freq=True), nn.Linear(3, 2)
    ).double()
    engine = gs.BatchPartitionEngine(model)
    tokens = torch.tensor([[1, 1, 2], [0, 1, 3], [2, 2, 2], [4, 1, 0], [3, 3, 1]])
    with engine.record([2, 3]):
        out = model(tokens)
    assert_matches_autograd(engine, sliced_losses(out, [2, 3]), list(model.parameters()))
    assert engine.slow_layers() == {}


def test_embedding_max_norm_takes_the_slow_path_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Linear(3, 2)).double()
    engine = gs.BatchPartitionEngine(model)
    with engine.record([2, 2]):
        out = model(torch.tensor([1, 2, 1, 4]))
    assert_matches_autograd(engine, sliced_losses(out, [2, 2]), list(model.parameters()))
    assert "max_norm" in engine.slow_layers()["0"]


# ---------------------------------------------------------------------------------------------
# Changes to the model after the engine was created.


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6)
        self.double()

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def run_step(model, engine, sizes, make_input):
    with engine.record(sizes):
        out = model(make_input())
    return sliced_losses(out, sizes)


@pytest.mark.parametrize("factored", ["never", "always"])
def test_weight_tying_after_creation_is_followed(factored):
    torch.manual_seed(0)
    model = Tied()
    engine = gs.BatchPartitionEngine(model, factored=factored)
    tokens = lambda: torch.randint(0, 6, (5, 2))  # noqa: E731
    losses = run_step(model, engine, [2, 3], tokens)
    assert_matches_autograd(engine, losses, list(model.parameters()))
    model.head.weight = model.embed.weight  # tied after the engine read the model
    losses = run_step(model, engine, [2, 3], tokens)
    with pytest.warns(UserWarning, match="head .Linear. changed.*weight tying"):
        assert_matches_autograd(engine, losses, list(model.parameters()))
    assert engine.slow_layers() == {}  # both layers' formulas, summed


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: parametrize.register_parametrization(layer, "weight", nn.Tanh()),
        lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
        lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
        lambda layer: torch.nn.utils.weight_norm(layer),
        lambda layer: torch.nn.utils.spectral_norm(layer),
    ],
    ids=["parametrize", "weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
@pytest.mark.parametrize("asked", ["params", "reached"])
def test_a_reparametrized_layer_after_creation_takes_the_slow_path(change, asked):
    torch.manual_seed(0)
    model = Tied()
    engine = gs.BatchPartitionEngine(model)
    tokens = torch.randint(0, 6, (4, 3))
    losses = run_step(model, engine, [2, 2], lambda: tokens)
    engine.jacobian(losses, list(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated hook-based ones
        change(model.body)
    model.eval()  # spectral_norm's power iteration would differ between the two passes
    losses = run_step(model, engine, [2, 2], lambda: tokens)
    with pytest.warns(UserWarning, match="body .Linear. changed.*slow per-task path"):
        if asked == "params":
            assert_matches_autograd(engine, losses, list(model.parameters()))
        else:  # the graph walk must look through the computed weight
            every = list(model.parameters())
            reference = task_jacobian(losses, every, retain_graph=True).matrix
            sizes = [p.numel() for p in every]
            blocks = dict(zip(map(id, every), reference.split(sizes, 1), strict=True))
            params, jacobian = engine.reached_jacobian(losses, [])
            assert {id(p) for p in params} == {id(p) for p in every}
            expected = torch.cat([blocks[id(p)] for p in params], dim=1)
            torch.testing.assert_close(jacobian.matrix, expected, **CLOSE64)
    assert "body" in engine.slow_layers()


def test_batch_norm_added_after_creation_is_refused():
    model = mlp()
    engine = gs.BatchPartitionEngine(model)
    model.insert(1, nn.BatchNorm1d(8).double())
    with engine.record([3, 3]):
        out = model(torch.randn(6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch normalization.*\(1, added after the engine"):
        engine.jacobian(sliced_losses(out, [3, 3]), list(model.parameters()))


def test_instance_norm_is_not_taken_for_batch_norm():
    # InstanceNorm runs batch normalization over a batch of one: it keeps samples apart.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2))
    model = model.double()
    engine = gs.BatchPartitionEngine(model)
    with engine.record([2, 3]):
        out = model(torch.randn(5, 3, dtype=torch.float64))
    assert_matches_autograd(engine, sliced_losses(out, [2, 3]), list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# Messages that say what happened.


@pytest.mark.parametrize("sizes", [[2.5, 3.5], [2.0, 4.0], [True, 5]])
def test_task_sizes_must_be_whole_numbers(sizes):
    engine = gs.BatchPartitionEngine(mlp())
    with pytest.raises(TypeError, match="whole row counts"):
        engine.record(sizes)


def test_task_sizes_may_be_numpy_or_tensor_integers():
    import numpy as np

    model = mlp()
    engine = gs.BatchPartitionEngine(model)
    for sizes in (np.array([2, 4]), torch.tensor([2, 4])):
        with engine.record(sizes):
            out = model(torch.randn(6, 5, dtype=torch.float64))
        assert_matches_autograd(engine, sliced_losses(out, [2, 4]), list(model.parameters()))


def test_task_sizes_that_do_not_sum_to_the_batch_are_named():
    model = mlp()
    engine = gs.BatchPartitionEngine(model)
    with engine.record([3, 4]):
        out = model(torch.randn(6, 5, dtype=torch.float64))
    with pytest.warns(UserWarning, match=r"task_sizes \[3, 4\] sum to 7 rows.*\[6\]"):
        assert_matches_autograd(engine, [out[:3].sum(), out[3:].sum()], list(model.parameters()))


def test_recording_twice_says_so():
    model = mlp()
    engine = gs.BatchPartitionEngine(model)
    with engine.record([3, 3]):
        first = model(torch.randn(6, 5, dtype=torch.float64))
    with engine.record([3, 3]):
        second = model(torch.randn(6, 5, dtype=torch.float64))
    both = zip(sliced_losses(first, [3, 3]), sliced_losses(second, [3, 3]), strict=True)
    losses = [a + b for a, b in both]
    with pytest.warns(UserWarning, match="entered again before the backward") as record:
        assert_matches_autograd(engine, losses, list(model.parameters()))
    assert not any("weight tying" in str(w.message) for w in record)


def test_an_engine_built_on_another_model_says_so():
    model, other = mlp(), mlp()
    engine = gs.BatchPartitionEngine(other)
    with engine.record([3, 3]):
        out = model(torch.randn(6, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not depend on the model the engine was built on"):
        engine.jacobian([out[:3].sum(), out[3:].sum()], list(model.parameters()))


def test_complex_parameters_are_refused_clearly():
    layer = nn.Linear(2, 2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        gs.BatchPartitionEngine(nn.Sequential(layer))
    loss = (layer(torch.ones(1, 2, dtype=torch.complex64)).abs() ** 2).sum()
    with pytest.raises(TypeError, match="complex"):
        gs.task_gradients([loss, loss], layer)


@pytest.mark.parametrize("engine", [None, "partition"])
def test_sparse_gradients_are_refused_clearly(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 1)).double()
    tokens = torch.tensor([1, 2, 3, 4])
    if engine is None:
        out = model(tokens)
        jacobian = lambda losses: task_jacobian(losses, list(model.parameters()))  # noqa: E731
    else:
        partition = gs.BatchPartitionEngine(model)
        with partition.record([2, 2]):
            out = model(tokens)
        jacobian = lambda losses: partition.jacobian(losses, list(model.parameters()))  # noqa: E731
    with pytest.raises(TypeError, match="sparse=False"):
        jacobian(sliced_losses(out, [2, 2]))


# ---------------------------------------------------------------------------------------------
# Float32 Gramians of tiny gradients.


def test_the_gramian_of_tiny_float32_gradients_keeps_their_conflict():
    directions = torch.tensor([[1.0, 0.5, -0.25], [-1.0, 0.25, 0.5]], dtype=torch.float64)
    gradients = (directions * 1e-20).repeat(1, 100)
    jacobian = TaskJacobian(gradients.float(), None, [300])
    expected = gradients @ gradients.T
    rows = torch.tensor(jacobian.gramian_rows(), dtype=torch.float64)
    for gramian in (jacobian.gramian(), rows):
        torch.testing.assert_close(gramian.double(), expected, rtol=1e-6, atol=0)
        assert gramian[0, 1] < 0  # the conflict is seen
    torch.testing.assert_close(
        jacobian.squared_norms().double(), expected.diagonal(), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(jacobian.squared_norm_values(), dtype=torch.float64),
        expected.diagonal(),
        rtol=1e-6,
        atol=0,
    )


def test_finite_float32_gradients_whose_products_overflow_get_a_float64_gramian():
    gradients = torch.tensor([[3e20, 1e20], [-2e20, 1e20]], dtype=torch.float64)
    jacobian = TaskJacobian(gradients.float(), None, [2])
    torch.testing.assert_close(jacobian.gramian(), gradients @ gradients.T, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        jacobian.squared_norms(), gradients.square().sum(1), rtol=1e-6, atol=0
    )


def test_a_zero_task_gradient_is_not_mistaken_for_an_underflow(monkeypatch):
    gradients = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    jacobian = TaskJacobian(gradients, None, [2])
    products = []
    original = TaskJacobian._gramian
    monkeypatch.setattr(
        TaskJacobian, "_gramian", lambda self, *a: products.append(a) or original(self, *a)
    )
    assert jacobian.gramian().dtype == torch.float32
    assert len(products) == 1  # no float64 product for an exact zero


def test_pcgrad_sees_the_conflict_of_tiny_float32_gradients():
    # Elements of 1e-23: their float32 products (1e-46) are below the smallest subnormal.
    w = torch.zeros(300, requires_grad=True)
    directions = torch.tensor([[1.0, 0.5, -0.25], [-1.0, 0.25, 0.5]]).repeat(1, 100)
    losses = [(w * d).sum() * 1e-23 for d in directions]
    optimizer = gs.PCGrad(torch.optim.SGD([w], lr=1.0))
    optimizer.pc_backward(losses)
    expected = gs.functional.pcgrad(directions.double() * 1e-23)
    torch.testing.assert_close(w.grad.double(), expected, rtol=1e-5, atol=0)
    plain_mean = directions.double().mean(0) * 1e-23
    assert not torch.allclose(w.grad.double(), plain_mean, rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------------------------
# Random models through the engine: the same Jacobian as per-task autograd, or a clear refusal.


class RandomModel(nn.Module):
    def __init__(self, draw) -> None:
        super().__init__()
        self.sequence = draw(st.sampled_from([0, 1, 3]))  # 0: one feature row per sample
        self.use_embedding = draw(st.booleans())
        width = draw(st.integers(1, 6))
        if self.use_embedding:
            scale_by_freq = draw(st.booleans())
            self.embed = nn.Embedding(
                7,
                width,
                padding_idx=draw(st.sampled_from([None, 0, 3])),
                scale_grad_by_freq=scale_by_freq,
                max_norm=draw(st.sampled_from([None, 1.0])),
                # torch has no sparse gradient with scale_grad_by_freq
                sparse=draw(st.booleans()) and draw(st.booleans()) and not scale_by_freq,
            )
        else:
            self.inp = nn.Linear(4, width, bias=draw(st.booleans()))
        layers: list[nn.Module] = []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["linear", "norm", "tanh"]))
            if kind == "linear":
                out = draw(st.integers(1, 6))
                layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
                width = out
            elif kind == "norm":
                affine = draw(st.booleans())
                layers.append(
                    nn.LayerNorm(width, elementwise_affine=affine, bias=draw(st.booleans()))
                )
            else:
                layers.append(nn.Tanh())
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.embed(x) if self.use_embedding else self.inp(x)
        return self.head(self.body(h))


@settings(max_examples=40)
@given(
    draw=st.data(),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    verify=st.sampled_from(["first", "never"]),
    factored=st.sampled_from(["auto", "always", "never"]),
    seed=st.integers(0, 2**16),
)
def test_random_models_get_autograd_gradients_or_a_clear_refusal(
    draw, sizes, dtype, verify, factored, seed
):
    torch.manual_seed(seed)
    model = RandomModel(draw.draw).to(dtype)
    n = sum(sizes)
    shape = (n, model.sequence) if model.sequence else (n,)
    x = torch.randint(0, 7, shape) if model.use_embedding else torch.randn(*shape, 4, dtype=dtype)
    engine = gs.BatchPartitionEngine(model, verify=verify, factored=factored)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slow-path notices are not under test here
        for _ in range(2):  # the checked first step of the pattern, and a trusted one
            with engine.record(sizes):
                out = model(x)
            losses = sliced_losses(out, sizes)
            if model.use_embedding and model.embed.sparse:
                with pytest.raises(TypeError, match="sparse=False"):
                    engine.jacobian(losses, params)
                return
            expected = task_jacobian(losses, params, retain_graph=True)
            actual = engine.jacobian(losses, params)
            if dtype == torch.float64:
                torch.testing.assert_close(actual.matrix, expected.matrix, **CLOSE64)
            else:
                scale = float(expected.matrix.abs().max()) + 1e-30
                torch.testing.assert_close(
                    actual.matrix, expected.matrix, rtol=1e-4, atol=1e-5 * scale
                )


# ---------------------------------------------------------------------------------------------
# Convolutions and per-sample normalizations on the fast path.


class RandomConvNet(nn.Module):
    def __init__(self, draw, dims: int) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
        groups = draw(st.sampled_from([1, 2]))
        stride = draw(st.integers(1, 2))
        padding_choices: list = [0, 1, 2, "valid"] + (["same"] if stride == 1 else [])
        self.conv = conv(
            2 * groups,
            2 * groups * draw(st.integers(1, 2)),
            kernel_size=draw(st.integers(1, 3)),
            stride=stride,
            padding=draw(st.sampled_from(padding_choices)),
            dilation=draw(st.integers(1, 2)),
            groups=groups,
            bias=draw(st.booleans()),
            padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])),
        )
        channels = self.conv.out_channels
        norm = draw(st.sampled_from(["group", "instance", "none"]))
        if norm == "group":
            self.norm = nn.GroupNorm(draw(st.sampled_from([1, 2])), channels)
        elif norm == "instance":
            instance = (nn.InstanceNorm1d, nn.InstanceNorm2d)[dims - 1]
            self.norm = instance(channels, affine=True)
        else:
            self.norm = nn.Identity()
        self.second = conv(channels, 3, kernel_size=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        return self.head(self.second(h).flatten(2).mean(dim=2))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40)
@given(
    draw=st.data(),
    dims=st.sampled_from([1, 2]),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_convolutions_and_per_sample_norms_match_autograd(device, draw, dims, sizes, dtype, seed):
    torch.manual_seed(seed)
    model = RandomConvNet(draw.draw, dims).to(device, dtype)
    spatial = (draw.draw(st.integers(8, 12)),) * dims  # InstanceNorm needs 2+ outputs
    x = torch.randn(sum(sizes), model.conv.in_channels, *spatial, dtype=dtype, device=device)
    engine = gs.BatchPartitionEngine(model)
    params = list(model.parameters())
    # TF32 convolutions (on by default on CUDA) would round both sides differently.
    with torch.backends.cudnn.flags(allow_tf32=False):
        for _ in range(2):
            with engine.record(sizes):
                out = model(x)
            losses = sliced_losses(out, sizes)
            expected = task_jacobian(losses, params, retain_graph=True).matrix
            actual = engine.jacobian(losses, params).matrix
            assert engine.slow_layers() == {}  # every layer on the fast path
            if dtype == torch.float64:
                torch.testing.assert_close(actual, expected, **CLOSE64)
            else:
                scale = float(expected.abs().max()) + 1e-30
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_an_unbatched_convolution_input_takes_the_slow_path():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 4, 3).double()  # a [C, L] input of 4 channels: C == the batch size
    engine = gs.BatchPartitionEngine(conv)
    with engine.record([2, 2]):
        out = conv(torch.randn(4, 8, dtype=torch.float64))
    assert_matches_autograd(engine, [out[:2].sum(), out[2:].pow(2).sum()], [conv.weight])
    assert "no batch dimension" in engine.slow_layers()[""]


def test_instance_norm_with_running_statistics_takes_the_slow_path():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    )
    model = model.double()
    engine = gs.BatchPartitionEngine(model)
    with engine.record([2, 3]):
        out = model(torch.randn(5, 2, 8, dtype=torch.float64))
    assert_matches_autograd(engine, sliced_losses(out, [2, 3]), list(model.parameters()))
    assert "track_running_stats" in engine.slow_layers()["1"]


def test_the_check_keeps_factored_layers_factored(monkeypatch):
    # The check compares one task's gradient at a time: no [T, in * out] block is built.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    engine = gs.BatchPartitionEngine(model, factored="always")
    calls = count_checks(monkeypatch)

    def refuse(self):
        raise AssertionError("the check expanded a factored layer")

    with engine.record([2, 3]):
        out = model(torch.randn(5, 6, dtype=torch.float64))
    losses = sliced_losses(out, [2, 3])
    expected = task_jacobian(losses, list(model.parameters()), retain_graph=True)
    with monkeypatch.context() as patch:
        patch.setattr(FactoredGradients, "dense", refuse)
        actual = engine.jacobian(losses, list(model.parameters()))
    assert len(calls) == 1 and actual.factored
    torch.testing.assert_close(actual.matrix, expected.matrix, **CLOSE64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["autocast", "bfloat16", "float16"])
def test_the_check_allows_for_reduced_precision_and_still_catches_mixing(device, precision):
    torch.manual_seed(0)
    dtype = torch.float32 if precision == "autocast" else getattr(torch, precision)
    model = nn.Sequential(
        nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4)
    ).to(device, dtype)
    x = torch.randn(192, 8, device=device, dtype=dtype)
    y = torch.randn(192, 4, device=device)
    for mixing in (False, True):
        engine = gs.BatchPartitionEngine(model)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "autocast"):
            with engine.record([64, 64, 64]):
                out = model(x)
            if mixing:  # the batch's mean reads every task's rows
                out = out - out.mean()
            pairs = zip(out.split(64), y.split(64), strict=True)
            losses = [(o.float() - t).pow(2).mean() for o, t in pairs]
        if mixing:
            with pytest.raises(RuntimeError, match="mixes samples"):
                engine.jacobian(losses, list(model.parameters()))
        else:  # bfloat16 rounding is not taken for mixing
            engine.jacobian(losses, list(model.parameters()))
        engine.remove()
