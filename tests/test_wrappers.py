"""The optimizer wrappers: the torch.optim protocol, copying, state dicts, and what they refuse.

Each test here was written against a defect of an earlier version (it fails there): copies and
pickles of a wrapper, hooks, scaled diagnostics, partial loads, a lost pending skip, overflowing
combinations, tasks the optimizer never sees, bad hyper-parameters and unhelpful crashes.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import gradsurgery as gs
from tests._models import MultiHead, assert_same_snapshot, model_and_batch, snapshot


def pcgrad(model, **options):
    return gs.PCGrad(torch.optim.Adam(model.parameters(), lr=1e-2), **options)


def train_pcgrad(model, opt, x, y, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        opt.pc_backward(model.losses(x, y))
        opt.step()


# -- copying and pickling --------------------------------------------------------------------
def test_deepcopy_of_a_wrapper_works_and_leaves_every_wrapper_working():
    model, x, y = model_and_batch()
    opt = pcgrad(model)
    train_pcgrad(model, opt, x, y)
    clone = copy.deepcopy(opt)
    assert clone.optimizer is not opt.optimizer
    assert torch.equal(clone.generator.get_state(), opt.generator.get_state())
    other_model, _, _ = model_and_batch()
    train_pcgrad(other_model, pcgrad(other_model), x, y)  # a new wrapper still steps
    train_pcgrad(model, opt, x, y)


@pytest.mark.parametrize("through", ["pickle", "torch.save"])
def test_a_wrapper_survives_pickling(through):
    model, x, y = model_and_batch()
    opt = pcgrad(model)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # it wraps the instance's step
    train_pcgrad(model, opt, x, y, steps=2)
    if through == "pickle":
        loaded = pickle.loads(pickle.dumps(opt))
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is gs.PCGrad
    assert loaded.conflict_stats.steps == 2
    assert repr(loaded.state_dict()) == repr(opt.state_dict())


# -- the torch.optim.Optimizer protocol --------------------------------------------------------
@pytest.mark.parametrize(
    "register",
    [
        "register_state_dict_pre_hook",
        "register_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_load_state_dict_post_hook",
        "register_step_pre_hook",
        "register_step_post_hook",
    ],
)
def test_every_hook_registration_of_torch_optim_works(register):
    model, x, y = model_and_batch()
    opt = pcgrad(model)
    calls = []
    handle = getattr(opt, register)(lambda *args: calls.append(args))
    train_pcgrad(model, opt, x, y)
    opt.load_state_dict(opt.state_dict())
    assert len(calls) == 1
    handle.remove()
    train_pcgrad(model, opt, x, y)
    opt.load_state_dict(opt.state_dict())
    assert len(calls) == 1


# -- GradScaler: diagnostics of the unscaled gradients ------------------------------------------
def test_pcgrad_info_under_a_grad_scaler_is_unscaled():
    model, x, y = model_and_batch(dtype=torch.float32)
    reference = MultiHead(dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    info = pcgrad(model).pc_backward(model.losses(x, y), grad_scaler=scaler)
    expected = pcgrad(reference).pc_backward(reference.losses(x, y))
    torch.testing.assert_close(info.grad_norms, expected.grad_norms)
    torch.testing.assert_close(info.gramian, expected.gramian)


# -- load_state_dict: all or nothing -------------------------------------------------------------
def test_pcgrad_load_state_dict_with_a_bad_generator_state_changes_nothing():
    model, x, y = model_and_batch()
    opt = pcgrad(model)
    train_pcgrad(model, opt, x, y)
    saved = opt.state_dict()
    train_pcgrad(model, opt, x, y)
    before = snapshot(model, opt)
    generator = opt.generator.get_state()
    with pytest.raises(ValueError, match="generator"):
        opt.load_state_dict({**saved, "generator": torch.zeros(7, dtype=torch.uint8)})
    assert_same_snapshot(before, snapshot(model, opt))
    assert torch.equal(opt.generator.get_state(), generator)


def test_pcgrad_load_state_dict_checks_the_number_of_tasks():
    model, x, y = model_and_batch()
    opt = pcgrad(model)
    train_pcgrad(model, opt, x, y)
    state = opt.state_dict()
    two_model, two_x, two_y = model_and_batch(num_tasks=2)
    two = pcgrad(two_model)
    train_pcgrad(two_model, two, two_x, two_y)
    with pytest.raises(ValueError, match="3 tasks"):
        two.load_state_dict(state)


@pytest.mark.parametrize("entry", ["initial_losses", "exp_avg", "exp_avg_sq"])
def test_gradnorm_load_state_dict_checks_every_vector_length(entry):
    model, x, y = model_and_batch()
    gn = gs.GradNorm(3, model.body[2])
    gn.backward(model.losses(x, y))
    state = copy.deepcopy(gn.state_dict())
    if entry == "initial_losses":
        state[entry] = state[entry][:2]
    else:
        state["optimizer"][entry] = state["optimizer"][entry][:2]
    before = repr(gn.state_dict())
    with pytest.raises(ValueError):
        gn.load_state_dict(state)
    assert repr(gn.state_dict()) == before


# -- a refused call keeps a pending skip ----------------------------------------------------------
def test_a_refused_backward_keeps_the_pending_step_skip():
    model, x, y = model_and_batch()
    opt = pcgrad(model, nonfinite="skip")
    losses = model.losses(x, y)
    opt.pc_backward([losses[0], losses[1] * math.nan, losses[2]])
    with pytest.raises(ValueError, match="empty"):
        opt.pc_backward([])
    before = snapshot(model)
    opt.step()  # still the skipped step
    assert_same_snapshot(before, snapshot(model))


# -- what is written is checked, not only what was read ---------------------------------------
def conflicting_losses(w, small):
    """Two conflicting tasks, the second ``small`` times smaller than the first."""
    a = torch.tensor([1.0, 0.5], dtype=w.dtype)
    b = torch.tensor([-1.0, 0.0], dtype=w.dtype)
    return [(w * a).sum(), small * (w * b).sum()]


@pytest.mark.parametrize(
    ("dtype", "first", "small"),
    [(torch.float16, 1.0, 1e-6), (torch.float64, 1e200, 1e200)],
)
def test_pcgrad_never_writes_an_overflowing_combination(dtype, first, small):
    w = torch.ones(2, dtype=dtype, requires_grad=True)
    opt = gs.PCGrad(torch.optim.SGD([w], lr=0.1))
    losses = conflicting_losses(w, small)
    losses[0] = losses[0] * first
    with pytest.raises(gs.NonFiniteError):
        opt.pc_backward(losses)
    assert w.grad is None
    skipping = gs.PCGrad(torch.optim.SGD([w], lr=0.1), nonfinite="skip")
    losses = conflicting_losses(w, small)
    losses[0] = losses[0] * first
    assert skipping.pc_backward(losses).skipped
    assert w.grad is None


# -- a task that the optimizer never sees ---------------------------------------------------------
def test_a_task_reaching_no_optimized_parameter_is_refused_by_name():
    model, x, y = model_and_batch()
    other = nn.Linear(5, 1).double()
    opt = pcgrad(model)
    losses = model.losses(x, y)
    losses[1] = other(x).pow(2).mean()  # a loss of another model
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"task\(s\) 1 reaches none of the optimized"):
        opt.pc_backward(losses)
    assert_same_snapshot(before, snapshot(model, opt))


def test_shared_parameters_outside_the_optimizer_are_refused():
    model, _, _ = model_and_batch()
    other = nn.Linear(5, 5)
    with pytest.raises(ValueError, match="does not optimize"):
        gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), shared_parameters=other)


# -- hyper-parameters and construction ------------------------------------------------------------
BAD_CONSTRUCTIONS = {
    "gradnorm-lr-nan": (lambda m: gs.GradNorm(3, m.body, lr=math.nan), "lr must be finite"),
    "gradnorm-lr-inf": (lambda m: gs.GradNorm(3, m.body, lr=math.inf), "lr must be finite"),
    "gradnorm-alpha-nan": (lambda m: gs.GradNorm(3, m.body, alpha=math.nan), "alpha"),
    "gradnorm-alpha-inf": (lambda m: gs.GradNorm(3, m.body, alpha=math.inf), "alpha"),
    "gradnorm-no-shared": (lambda m: gs.GradNorm(3, None), "needs shared_parameters"),
    "generator-0": (
        lambda m: gs.PCGrad(torch.optim.SGD(m.parameters(), lr=0.1), generator=0),
        "torch.Generator",
    ),
    "engine-string": (
        lambda m: gs.PCGrad(torch.optim.SGD(m.parameters(), lr=0.1), engine="partition"),
        "engine must be",
    ),
    "gradnorm-engine-string": (
        lambda m: gs.GradNorm(3, m.body, engine="partition"),
        "engine must be",
    ),
    "complex-parameter": (
        lambda m: gs.PCGrad(
            torch.optim.SGD([torch.zeros(2, dtype=torch.cfloat, requires_grad=True)])
        ),
        "complex",
    ),
    "sparse-embedding": (
        lambda m: gs.PCGrad(
            torch.optim.SGD(m.parameters(), lr=0.1),
            engine=gs.BatchPartitionEngine(nn.Sequential(nn.Embedding(4, 2, sparse=True))),
        ),
        "sparse=True",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONSTRUCTIONS))
def test_bad_construction_is_refused_with_a_clear_message(case):
    model, _, _ = model_and_batch()
    make, message = BAD_CONSTRUCTIONS[case]
    with pytest.raises((TypeError, ValueError), match=message):
        make(model)


def test_a_sparse_gradient_is_refused_with_a_clear_message():
    embedding = nn.Embedding(4, 2, sparse=True)
    opt = gs.PCGrad(torch.optim.SGD(embedding.parameters(), lr=0.1))
    out = embedding(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="sparse=False"):
        opt.pc_backward([out[0].sum(), out[1].sum()])
    assert embedding.weight.grad is None


# -- GradNorm's finiteness checks ---------------------------------------------------------------
def test_gradnorm_takes_finite_gradients_whose_squared_norm_overflows_float32():
    w = torch.ones(4, requires_grad=True)  # float32
    gn = gs.GradNorm(2, [w])
    info = gn.backward([1e20 * w.sum(), w.pow(2).sum()])
    assert not info.skipped
    torch.testing.assert_close(info.grad_norms[0].item(), 2e20, rtol=1e-6, atol=0)
    assert torch.isfinite(w.grad).all()


def test_gradnorm_names_only_the_task_with_an_inf_in_a_factored_layer():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 8), nn.Linear(8, 2)
    model = nn.Sequential(first, second)
    engine = gs.BatchPartitionEngine(model, factored="always")
    gn = gs.GradNorm(2, first, engine=engine, nonfinite="skip")
    x = torch.randn(6, 4)
    x[4, 0] = math.inf  # a row of task 1, whose output is then dropped: a finite loss
    keep = torch.ones(6, 1, dtype=torch.bool)
    keep[4] = False
    with engine.record([3, 3]):
        out = second(torch.tanh(torch.where(keep, first(x), 0.0)))
    losses = [out[:3, 0].pow(2).mean(), out[3:, 1].pow(2).mean()]
    assert all(torch.isfinite(loss) for loss in losses)
    info = gn.backward(losses)
    assert info.skipped
    assert info.nonfinite_tasks == (1,)  # the gradient of W is NaN in task 1's rows only
