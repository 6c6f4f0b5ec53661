"""Representation mode: ``MultiTaskOptimizer.backward(losses, representation=z)``."""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import gradsurgery as gs
from gradsurgery import Method, Needs, TaskStats
from gradsurgery import methods as M


class SharedInput(nn.Module):
    """One encoder, one head per task, every task reading the same batch."""

    def __init__(self, num_tasks: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z).squeeze(1) for head in self.heads]


def _losses(model: SharedInput, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    dtype = model.heads[0].weight.dtype
    x = torch.randn(16, 5, generator=g, dtype=dtype)
    targets = torch.randn(len(model.heads), 16, generator=g, dtype=dtype)
    z, outs = model(x)
    return z, [
        (out - t).pow(2).mean() * (k + 1)
        for k, (out, t) in enumerate(zip(outs, targets, strict=True))
    ]


def _model(num_tasks: int = 3, dtype: torch.dtype = torch.float64) -> SharedInput:
    torch.manual_seed(0)
    return SharedInput(num_tasks).to(dtype)


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _by_hand(model: SharedInput, method: Method) -> list[torch.Tensor]:
    """Weights from the representation's Gramian, then the encoder's gradient by autograd."""
    z, losses = _losses(model)
    rep = torch.stack([torch.autograd.grad(x, z, retain_graph=True)[0].reshape(-1) for x in losses])
    gramian = (rep @ rep.T).tolist()
    decision = method.decide(TaskStats(tuple(x.item() for x in losses), gramian_rows=gramian))
    weights = torch.as_tensor(decision.weights, dtype=z.dtype)
    encoder = list(model.encoder.parameters())
    grads = torch.autograd.grad(z, encoder, (weights @ rep).view_as(z), retain_graph=True)
    # Each head is reached by its own task only: "weights" scales its gradient by the task's
    # weight; "mean" and "sum" give it the task's plain gradient.
    for k, (head, loss) in enumerate(zip(model.heads, losses, strict=True)):
        scale = weights[k] if method.unshared == "weights" else 1.0
        grads += tuple(
            scale * g for g in torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        )
    return list(grads)


@pytest.mark.parametrize("name", ["PCGrad", "MGDA", "UPGrad", "CAGrad", "AlignedMTL", "DBMTL"])
def test_equals_the_hand_written_computation(name):
    factory = _method_class(name)
    model = _model()
    expected = _by_hand(model, _fresh(factory))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _fresh(factory))
    z, losses = _losses(model)
    info = opt.backward(losses, representation=z)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert info.weights is not None


def _fresh(factory):
    method = factory()
    if getattr(method, "generator", None) is not None:
        method.generator.manual_seed(0)
    return method


def test_differs_from_the_exact_mode():
    """Not the exact step: the representation's Gramian is another Gramian."""
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())
    z, losses = _losses(model)
    opt.backward(losses, representation=z)
    approximate = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    opt.zero_grad()
    z, losses = _losses(model)
    opt.backward(losses)
    exact = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    assert not torch.allclose(approximate, exact)
    assert torch.nn.functional.cosine_similarity(approximate, exact, dim=0) > 0.5


def _all_methods():
    found = []
    for module_info in pkgutil.iter_modules(M.__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{M.__name__}.{module_info.name}")
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and issubclass(cls, Method)
                and cls.__module__ == module.__name__
            ):
                found.append(cls)
    return found


def _method_class(name):
    return next(cls for cls in _all_methods() if cls.__name__ == name)


def _build(cls, num_tasks):
    if cls.__name__ == "LinearScalarization":
        return cls([1.0 + t for t in range(num_tasks)])
    if "num_tasks" in inspect.signature(cls).parameters:
        return cls(num_tasks=num_tasks)
    return cls()


@pytest.mark.parametrize("cls", _all_methods(), ids=lambda c: c.__name__)
def test_every_method_runs(cls):
    model = _model(dtype=torch.float32)
    method = _build(cls, 3)
    extra = list(method.parameters()) if hasattr(method, "parameters") else []
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*model.parameters(), *extra], lr=0.1), method)
    for step in range(3):
        opt.zero_grad()
        z, losses = _losses(model, seed=step)
        info = opt.backward(losses, representation=z)
        opt.step()
        assert not info.skipped
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0


def test_every_method_is_found():
    names = {cls.__name__ for cls in _all_methods()}
    assert {"PCGrad", "GradNorm", "Mean"} <= names


def test_graddrop_works_on_the_representation_coordinates():
    graddrop = _method_class("GradDrop")
    model = _model()
    method = graddrop(generator=torch.Generator().manual_seed(0))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
    z, losses = _losses(model)
    rep = torch.stack([torch.autograd.grad(x, z, retain_graph=True)[0].reshape(-1) for x in losses])
    expected_method = graddrop(generator=torch.Generator().manual_seed(0))
    from gradsurgery._jacobian import TaskJacobian

    decision = expected_method.decide(
        TaskStats(
            tuple(x.item() for x in losses),
            gramian_rows=(rep @ rep.T).tolist(),
            jacobian=TaskJacobian(rep.clone(), None, [z.numel()]),
        )
    )
    expected = torch.autograd.grad(
        z, list(model.encoder.parameters()), decision.direction[0].view_as(z), retain_graph=True
    )
    opt.backward(losses, representation=z)
    for p, g in zip(model.encoder.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_several_representation_tensors():
    """Two tensors marked: equal to the one tensor they are sliced from."""
    model = _model()
    z, losses = _losses(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())
    opt.backward(losses, representation=z)
    whole = _grads(model)

    class Split(SharedInput):
        def forward(self, x):
            z = self.encoder(x)
            a, b = z[:, :3], z[:, 3:]
            return (a, b), [head(torch.cat([a, b], 1)).squeeze(1) for head in self.heads]

    split = Split(3).double()
    split.load_state_dict(model.state_dict())
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(split.parameters(), lr=0.1), M.PCGrad())
    parts, losses = _losses(split)
    opt.backward(losses, representation=parts)
    for g, p in zip(whole, split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


# -- every task's representation gradient from one backward pass ----------------------------

HEAD_KINDS = ("linear", "square", "slices", "two-reads", "cat")
SHARED_KINDS = ("shared-layer", "shared-bias", "loss-is-representation")


def _kind_losses(kind: str, num_tasks: int, batch: int, seed: int):
    """A shared-input model whose heads read ``z`` in the way ``kind`` says; returns the
    representation(s), the losses and the optimized parameters."""
    g = torch.Generator().manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    heads = [nn.Linear(6, 2).double() for _ in range(num_tasks)]
    extra = [nn.Linear(6, 6).double(), nn.Linear(6, 2).double()]
    shared_bias = torch.nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
    for module in [encoder, *heads, *extra]:
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    x = torch.randn(batch, 5, generator=g, dtype=torch.float64)
    z = encoder(x)
    if kind == "linear":
        outs = [h(z) for h in heads]
    elif kind == "square":  # one node reads z twice
        outs = [h(z * z) for h in heads]
    elif kind == "slices":
        outs = [h(torch.cat([z[:, t % 6 :], z[:, : t % 6]], 1)) for t, h in enumerate(heads)]
    elif kind == "two-reads":  # two nodes of one task read z
        outs = [h(z) + h(z.sin()) for h in heads]
    elif kind == "cat":
        outs = [h(torch.cat([z[:, :3], z[:, 3:]], 1)) for h in heads]
    elif kind == "shared-layer":  # one node reads z for every task
        trunk = extra[0](z)
        outs = [h(trunk) for h in heads]
    elif kind == "shared-bias":  # a head parameter every task reaches
        outs = [h(z) + shared_bias for h in heads]
    else:  # "loss-is-representation"
        outs = [h(z) for h in heads]
    targets = torch.randn(num_tasks, batch, 2, generator=g, dtype=torch.float64)
    losses = [(out - t).pow(2).mean() for out, t in zip(outs, targets, strict=True)]
    reps = [z]
    if kind == "loss-is-representation":
        reps.append(losses[0])
    params = [*encoder.parameters(), *(p for h in heads for p in h.parameters())]
    params += [*extra[0].parameters(), *extra[1].parameters(), shared_bias]
    return reps, losses, params


def _representation_gradients(losses, reps) -> torch.Tensor:
    """``[T, numel]``: each loss's gradient of the representation, one autograd call each."""
    rows = []
    for x in losses:
        grads = torch.autograd.grad(x, reps, retain_graph=True, allow_unused=True)
        found = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, reps, strict=True)]
        rows.append(torch.cat([g.reshape(-1) for g in found]))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(HEAD_KINDS + SHARED_KINDS),
    num_tasks=st.integers(1, 5),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_one_backward_gives_each_tasks_gradients_as_one_call_per_task(kind, num_tasks, batch, seed):
    from gradsurgery._representation import _heads, _task_gradients

    if kind == "loss-is-representation":  # another task must read z
        num_tasks = max(num_tasks, 2)
    reps, losses, params = _kind_losses(kind, num_tasks, batch, seed)
    heads, reached, readers = _heads(losses, reps, params)
    # The single pass is taken where it can tell the tasks apart, and only there (a layer or
    # a parameter "shared" by a single task is that task's own).
    alone = num_tasks == 1 and kind != "loss-is-representation"
    assert (readers is not None) == (kind in HEAD_KINDS or alone)
    if readers is None:
        return
    one = _task_gradients(losses, reps, heads, reached, readers)
    per_task = _task_gradients(losses, reps, heads, reached, None)
    for fast, slow in zip(one, per_task, strict=True):
        torch.testing.assert_close(fast.dense, slow.dense, rtol=1e-13, atol=1e-300)
    by_hand = _representation_gradients(losses, reps)
    torch.testing.assert_close(one[0].dense, by_hand, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_tasks_that_meet_inside_the_heads_take_one_call_each(kind):
    reps, losses, params = _kind_losses(kind, 3, 4, seed=1)
    method = M.UPGrad()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), method)
    rep = _representation_gradients(losses, reps)
    expected = M.UPGrad().decide(
        TaskStats(tuple(x.item() for x in losses), gramian_rows=(rep @ rep.T).tolist())
    )
    opt.backward(losses, representation=reps)
    torch.testing.assert_close(opt.weights, torch.tensor(expected.weights, dtype=torch.float64))


def test_the_hooks_are_gone_after_the_step(monkeypatch):
    """The nodes that read the representation are the user's: nothing stays on them (a hook
    left there would keep the step's gradient matrix alive as long as the graph)."""
    import gc
    import weakref

    import gradsurgery._representation as R

    seen = []
    one_backward = R._one_backward

    def spy(losses, reps, heads, reached, readers, rep_rows, head_rows):
        seen.append(weakref.ref(rep_rows[0][0]))
        return one_backward(losses, reps, heads, reached, readers, rep_rows, head_rows)

    monkeypatch.setattr(R, "_one_backward", spy)
    reps, losses, params = _kind_losses("linear", 3, 4, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), M.PCGrad())
    opt.backward(losses, representation=reps)
    gc.collect()
    assert len(seen) == 1
    assert seen[0]() is None  # while the graph (losses, reps) is still alive


# -- bad input: refused, and nothing changed ---------------------------------------------------


def _refused(model, opt, make, match):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = _grads(model)
    state = copy.deepcopy(opt.state_dict())
    z, losses = make()
    with pytest.raises(ValueError, match=match):
        opt.backward(losses, representation=z)
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)
    assert str(opt.state_dict()) == str(state)
    assert opt.num_tasks is None


def test_refuses_a_representation_no_loss_reads():
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())

    def make():
        _, losses = _losses(model)
        return model.encoder(torch.ones(2, 5, dtype=torch.float64)), losses

    _refused(model, opt, make, "read by no loss")


def test_refuses_a_loss_that_does_not_read_the_representation():
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())

    def make():
        z, losses = _losses(model)
        losses[1] = model.heads[1].weight.pow(2).sum()
        return z, losses

    _refused(model, opt, make, "task 1 does not depend on the representation")


def test_refuses_a_detached_representation():
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())

    def make():
        z = model.encoder(torch.ones(4, 5, dtype=torch.float64)).detach().requires_grad_()
        return z, [head(z).sum() for head in model.heads]

    _refused(model, opt, make, "no autograd graph behind it")


def test_refuses_a_path_around_the_representation():
    """A skip connection from inside the encoder to a head: the encoder's first layer would
    lose the part of its gradient that goes around the representation."""
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())

    def make():
        hidden = model.encoder[1](model.encoder[0](torch.ones(4, 5, dtype=torch.float64)))
        z = model.encoder[2](hidden)
        losses = [head(z).sum() for head in model.heads]
        losses[0] = losses[0] + hidden.sum()
        return z, losses

    _refused(model, opt, make, "both through the representation and around it")


def test_refuses_distributed(monkeypatch):
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())
    monkeypatch.setattr("gradsurgery._representation.synchronizer", lambda *a: object())
    _refused(model, opt, lambda: _losses(model), "does not synchronize across processes")


def test_nonfinite_gradient_refused_with_nothing_changed():
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.PCGrad())

    def make():
        z, losses = _losses(model)
        losses[2] = losses[2] + (z * torch.tensor(float("inf"))).sum() * 0.0
        return z, losses

    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = _grads(model)
    z, losses = make()
    with pytest.raises(gs.NonFiniteError, match="task\\(s\\) 2"):
        opt.backward(losses, representation=z)
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)


def test_loss_weighting_takes_the_exact_update():
    """A method that reads loss values only needs no task gradient: the same update."""
    model = _model()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), M.Mean())
    z, losses = _losses(model)
    opt.backward(losses, representation=z)
    approximate = _grads(model)
    opt.zero_grad()
    z, losses = _losses(model)
    opt.backward(losses)
    for p, g in zip(model.parameters(), approximate, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert M.Mean.needs == Needs.LOSSES


# -- the batch dimension: LibMTL's convention as an option -------------------------------------


def test_batch_sum_takes_the_gramian_of_the_batch_summed_gradients():
    """LibMTL's rep_grad: per-task gradients summed over the batch, then their Gramian; the
    combination through the encoder stays per sample."""
    model = _model()
    method = _method_class("MGDA")
    z, losses = _losses(model)
    rep = torch.stack([torch.autograd.grad(x, z, retain_graph=True)[0] for x in losses])
    summed = rep.sum(1)  # [T, B, D] -> [T, D]
    stats = TaskStats(tuple(x.item() for x in losses), gramian_rows=(summed @ summed.T).tolist())
    weights = torch.as_tensor(method().decide(stats).weights, dtype=z.dtype)
    encoder = list(model.encoder.parameters())
    expected = torch.autograd.grad(z, encoder, torch.einsum("t,tbd->bd", weights, rep))
    samples = (rep.flatten(1) @ rep.flatten(1).T).tolist()
    other = method().decide(TaskStats(stats.losses, gramian_rows=samples)).weights
    assert not torch.allclose(torch.as_tensor(other, dtype=z.dtype), weights)  # they differ

    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method())
    z, losses = _losses(model)
    opt.backward(losses, representation=z, representation_batch="sum")
    for p, g in zip(encoder, expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_batch_sum_refused_for_a_coordinate_method_and_without_a_representation():
    model = _model()
    graddrop = _method_class("GradDrop")
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), graddrop())
    z, losses = _losses(model)
    with pytest.raises(ValueError, match="coordinates"):
        opt.backward(losses, representation=z, representation_batch="sum")
    with pytest.raises(ValueError, match="only read with representation="):
        opt.backward(losses, representation_batch="sum")
    with pytest.raises(ValueError, match="representation_batch must be one of"):
        opt.backward(losses, representation=z, representation_batch="mean")
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_sees_the_unscaled_update():
    """Under a GradScaler the method decides from unscaled gradients and .grad is scaled."""
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = _model()
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _fresh(M.PCGrad))
        z, losses = _losses(model)
        info = opt.backward(losses, representation=z, grad_scaler=scaler)
        scale = 1.0 if scaler is None else 2.0**12
        grads.append(([p.grad / scale for p in model.parameters()], info.gramian))
    for a, b in zip(grads[0][0], grads[1][0], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads[0][1], grads[1][1])
