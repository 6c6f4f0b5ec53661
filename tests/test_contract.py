"""The promises every method keeps, checked for each method of tests/_registry.py.

Bad input raises a clear error and changes nothing; the NaN/Inf policy; the state dict round
trip and a bit-for-bit resume; a GradScaler gives the unscaled update and unscaled
diagnostics; both engines agree; two processes equal one; the wrapper deep-copies, pickles
and honours torch.optim.Optimizer's hooks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradsurgery as gs
from tests._registry import METHODS
from tests.test_distributed import free_port, join_or_fail

T, ROWS = 3, 8
IDS = [name for name, _ in METHODS]
FACTORIES = dict(METHODS)


class TaskModel(nn.Module):
    """A shared body and one output column per task; task ``t`` reads rows ``t * ROWS...``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, T)
        self.double()

    def losses(self, x, y, engine=None) -> list[torch.Tensor]:
        recording = engine.record([ROWS] * T) if engine is not None else contextlib.nullcontext()
        with recording:
            out = self.head(self.body(x))
        return [
            (out[t * ROWS : (t + 1) * ROWS, t] - y[t * ROWS : (t + 1) * ROWS]).pow(2).mean()
            for t in range(T)
        ]


def data(step: int, rows: slice = slice(None)):
    """The batch of one step; ``rows`` picks each task's share (for the processes)."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(T, ROWS, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(T, ROWS, generator=generator, dtype=torch.float64)
    y[1] = -y[1] + 2 * x[1, :, 0]  # conflicting tasks
    y = y * (1 + step % 3)  # changing loss scales move the loss-based weightings
    return x[:, rows].reshape(-1, 5), y[:, rows].reshape(-1)


def build(name: str, *, engine: str = "autograd", seed: int = 0, **options):
    """A model, and the registry's method wrapped around an Adam over the model (and the
    method's own parameters, if it learns some)."""
    torch.manual_seed(seed)
    model = TaskModel()
    method = FACTORIES[name](T)
    extra = list(method.parameters()) if callable(getattr(method, "parameters", None)) else []
    optimizer = torch.optim.Adam([*model.parameters(), *extra], lr=1e-2)
    fast = gs.BatchPartitionEngine(model) if engine == "partition" else None
    wrapper = gs.MultiTaskOptimizer(optimizer, method, engine=fast, **options)
    return model, wrapper


def train(model, wrapper, steps: range, **backward_options) -> list:
    infos = []
    for step in steps:
        x, y = data(step)
        wrapper.zero_grad()
        losses = model.losses(x, y, recording_engine(wrapper))
        infos.append(wrapper.backward(losses, **backward_options))
        wrapper.step()
    return infos


def recording_engine(wrapper):
    """The engine to record the forward pass with, when it is the batch-partition one."""
    return wrapper.engine if isinstance(wrapper.engine, gs.BatchPartitionEngine) else None


def everything(model, wrapper) -> dict:
    """All a refused call must leave as it was."""
    generator = wrapper.method.generator
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": repr(wrapper.optimizer.state_dict()),
        "method": repr(wrapper.method.state_dict()),
        "generator": None if generator is None else generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "num_tasks": wrapper.num_tasks,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in before:
        a, b = before[key], after[key]
        if key in ("params", "grads"):
            for u, v in zip(a, b, strict=True):
                assert (u is None and v is None) or torch.equal(u, v), key
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


def bad_losses(case: str, model: TaskModel, x, y) -> list:
    losses = model.losses(x, y)
    if case == "empty":
        return []
    if case == "wrong-count":
        return losses[:2]
    if case == "non-scalar":
        return [losses[0], losses[1] * torch.ones(2, dtype=torch.float64), losses[2]]
    if case == "no-grad":
        return [losses[0], losses[1].detach(), losses[2]]
    if case == "not-a-tensor":
        return [losses[0], 1.0, losses[2]]
    if case == "nan-loss":
        return [losses[0], losses[1] * float("nan"), losses[2]]
    if case == "nan-gradient":
        kink = (model.body[2].weight * 0).sqrt().sum()  # value 0, gradient NaN
        return [losses[0], losses[1] + kink, losses[2]]
    if case == "other-model":
        stray = nn.Linear(5, 1).double()
        return [losses[0], losses[1], stray(x).pow(2).mean()]
    raise AssertionError(case)


BAD = {
    "empty": (ValueError, "empty"),
    "wrong-count": (ValueError, "expected 3 losses"),
    "non-scalar": (ValueError, "task 1 is not a scalar"),
    "no-grad": (ValueError, "task 1 does not require grad"),
    "not-a-tensor": (TypeError, "task 1 is a float"),
    "nan-loss": (gs.NonFiniteError, r"loss of task\(s\) 1 holds NaN"),
    "nan-gradient": (gs.NonFiniteError, r"task\(s\) 1 holds NaN|weighted gradient"),
    "other-model": (ValueError, r"task\(s\) 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("name", IDS)
def test_bad_input_raises_a_clear_error_and_changes_nothing(name, case):
    model, wrapper = build(name)
    # A loss weighting checks the reach of the losses on its first step only (see the next test).
    if not (case == "other-model" and FACTORIES[name](T).needs == gs.Needs.LOSSES):
        train(model, wrapper, range(2))  # optimizer and method state, and .grad, to protect
    x, y = data(2)
    losses = bad_losses(case, model, x, y)
    before = everything(model, wrapper)
    error, message = BAD[case]
    with pytest.raises(error, match=message):
        wrapper.backward(losses)
    assert_unchanged(before, everything(model, wrapper))


LOSS_WEIGHTINGS = [name for name in IDS if FACTORIES[name](T).needs == gs.Needs.LOSSES]


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_after_the_first_step_a_loss_that_reaches_nothing_adds_nothing(name):
    # A loss weighting's update is the gradient of sum_i w_i L_i whatever the losses reach; the
    # reach is checked on the first step only, where a wrong loop shows itself.
    model, wrapper = build(name)
    train(model, wrapper, range(2))
    x, y = data(2)
    wrapper.zero_grad()
    info = wrapper.backward(bad_losses("other-model", model, x, y))
    expected = torch.autograd.grad(
        sum(w * loss for w, loss in zip(info.weights, model.losses(x, y)[:2], strict=False)),
        list(model.parameters()),
    )
    for parameter, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, grad)


@pytest.mark.parametrize("name", IDS)
def test_nonfinite_skip_changes_nothing_and_skips_the_next_step(name):
    model, wrapper = build(name, nonfinite="skip")
    train(model, wrapper, range(2))
    x, y = data(2)
    for case, tasks in (("nan-loss", (1,)), ("nan-gradient", (1,))):
        before = everything(model, wrapper)
        info = wrapper.backward(bad_losses(case, model, x, y))
        assert info.skipped
        if case == "nan-loss" or FACTORIES[name](T).needs > gs.Needs.LOSSES:
            assert info.nonfinite_tasks == tasks
        wrapper.step()  # skipped: the parameters stay
        assert_unchanged(before, everything(model, wrapper))
    # A refused call keeps a pending skip: the step after it is still skipped.
    wrapper.backward(bad_losses("nan-loss", model, x, y))
    with pytest.raises(ValueError):
        wrapper.backward([])
    before = everything(model, wrapper)
    wrapper.step()
    assert_unchanged(before, everything(model, wrapper))


@pytest.mark.parametrize("name", IDS)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    model, wrapper = build(name)
    train(model, wrapper, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(wrapper.state_dict())
    train(model, wrapper, range(3, 6))

    resumed_model, resumed = build(name, seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(pickle.loads(pickle.dumps(saved)))
    train(resumed_model, resumed, range(3, 6))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert repr(resumed.method.state_dict()) == repr(wrapper.method.state_dict())


@pytest.mark.parametrize("name", IDS)
def test_a_refused_load_state_dict_changes_nothing(name):
    model, wrapper = build(name)
    train(model, wrapper, range(2))
    good = wrapper.state_dict()
    bad_states = [
        {**good, "num_tasks": T + 1},
        {**good, "optimizer": {**good["optimizer"], "param_groups": []}},
        {k: v for k, v in good.items() if k != "optimizer"},
    ]
    if wrapper.method.generator is not None:
        bad_states.append({**good, "generator": torch.zeros(3, dtype=torch.uint8)})
    before = everything(model, wrapper)
    for bad in bad_states:
        with pytest.raises((ValueError, KeyError, TypeError, RuntimeError)):
            wrapper.load_state_dict(bad)
        assert_unchanged(before, everything(model, wrapper))


@pytest.mark.parametrize("name", IDS)
def test_grad_scaler_gives_the_unscaled_update_and_unscaled_diagnostics(name):
    model, wrapper = build(name)
    reference_model, reference = build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = data(step)
        wrapper.zero_grad()
        info = wrapper.backward(model.losses(x, y), grad_scaler=scaler)
        scaler.step(wrapper)
        scaler.update()
        reference.zero_grad()
        expected = reference.backward(reference_model.losses(x, y))
        reference.step()
        for field in ("weights", "grad_norms", "gramian", "losses"):
            a, b = getattr(info, field), getattr(expected, field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_both_engines_give_the_same_training(name):
    slow_model, slow = build(name)
    fast_model, fast = build(name, engine="partition")
    slow_infos = train(slow_model, slow, range(4))
    fast_infos = train(fast_model, fast, range(4))
    for a, b in zip(slow_model.parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(slow_infos[-1].weights, fast_infos[-1].weights)


@pytest.mark.parametrize("name", IDS)
def test_deepcopy_pickle_and_torch_save_of_the_wrapper(name):
    model, wrapper = build(name)
    train(model, wrapper, range(2))
    copies = [copy.deepcopy(wrapper), pickle.loads(pickle.dumps(wrapper))]
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    for clone in copies:
        assert type(clone) is type(wrapper)
        assert repr(clone.state_dict()) == repr(wrapper.state_dict())
        assert clone.optimizer.param_groups[0]["params"][0] is not model.body[0].weight
    # The original (and any new wrapper) still works after the copies.
    train(model, wrapper, range(2, 3))
    other_model, other = build(name)
    train(other_model, other, range(1))


@pytest.mark.parametrize("name", IDS)
def test_every_optimizer_hook_registers_on_the_wrapper_and_runs(name):
    model, wrapper = build(name)
    calls = []
    handles = [
        wrapper.register_step_pre_hook(lambda *a: calls.append("step_pre")),
        wrapper.register_step_post_hook(lambda *a: calls.append("step_post")),
        wrapper.register_state_dict_pre_hook(lambda *a: calls.append("sd_pre")),
        wrapper.register_state_dict_post_hook(lambda *a: calls.append("sd_post")),
        wrapper.register_load_state_dict_pre_hook(lambda *a: calls.append("load_pre")),
        wrapper.register_load_state_dict_post_hook(lambda *a: calls.append("load_post")),
    ]
    train(model, wrapper, range(1))
    wrapper.load_state_dict(wrapper.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]
    for handle in handles:
        handle.remove()
    train(model, wrapper, range(1, 2))
    assert len(calls) == 6


# -- two processes equal one -------------------------------------------------------------------
STEPS = 3


def _distributed_run(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    results = {}
    for name in IDS:
        model, wrapper = build(name)
        share = ROWS // world
        for step in range(STEPS):
            x, y = data(step, slice(rank * share, (rank + 1) * share))
            # Each process's rows of task t: the model sees [T * share] rows, task-major.
            out = model.head(model.body(x))
            losses = [
                (out[t * share : (t + 1) * share, t] - y[t * share : (t + 1) * share]).pow(2).mean()
                for t in range(T)
            ]
            wrapper.zero_grad()
            wrapper.backward(losses)
            wrapper.step()
        results[name] = [p.detach().clone() for p in model.parameters()]
    return results


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_distributed_run(rank, world), Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_batches_equal_one_process_with_the_whole(tmp_path):
    """One spawn runs every method of the registry (spawning is the slow part)."""
    context = mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    join_or_fail(context)
    single = _distributed_run(0, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in IDS:
        for result in ranks:
            for a, b in zip(result[name], single[name], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
