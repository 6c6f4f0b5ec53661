"""DWA against torchjd's DWA and the MTAN authors' rule (as LibMTL's DWA transcribes it),
over several epochs and steps, and the defining properties of its weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.scalarization import DWA as TorchjdDWA

from gradsurgery._weighting import Needs
from gradsurgery.functional import dwa_weights
from gradsurgery.methods.dwa import DWA

from ._loss_weighting import (
    assert_close,
    assert_refusal_changes_nothing,
    assert_resumes_bit_exactly,
    decide,
    gradient_weights,
    positive_losses,
    random_losses,
    step,
)

EPOCHS, BATCHES = 5, 4


def epochs(num_tasks: int, seed: int, scale: float = 1.0) -> list[list[list[float]]]:
    rows = random_losses(EPOCHS * BATCHES, num_tasks, seed, scale)
    return [rows[e * BATCHES : (e + 1) * BATCHES] for e in range(EPOCHS)]


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_agrees_with_torchjd_per_epoch(num_tasks, temperature, scale):
    ours, theirs = DWA(temperature), TorchjdDWA(temperature)
    for batches in epochs(num_tasks, seed=num_tasks, scale=scale):
        for losses in batches:
            assert_close(step(ours, losses), gradient_weights(theirs, losses), rtol=1e-12)
        ours.end_epoch()
        theirs.step()


def test_agrees_with_torchjd_per_step():
    """torchjd's window is whatever lies between two ``step()`` calls: one step here."""
    ours, theirs = DWA(window="step"), TorchjdDWA()
    for losses in random_losses(12, 3, seed=5):
        assert_close(step(ours, losses), gradient_weights(theirs, losses), rtol=1e-12)
        theirs.step()


def test_agrees_with_the_authors_rule():
    """MTAN's training loop (lorenmt/mtan, as LibMTL/weighting/DWA.py keeps it): in epoch
    ``e > 1``, ``w = K softmax(buffer[:, e-1] / buffer[:, e-2] / T)`` with ``buffer[:, e]`` the
    epoch's average training losses; weights 1 in epochs 0 and 1."""
    num_tasks, T = 3, 2.0
    data = epochs(num_tasks, seed=11)
    buffer = torch.zeros(num_tasks, EPOCHS, dtype=torch.float64)
    method = DWA(T)
    for epoch, batches in enumerate(data):
        for losses in batches:
            if epoch > 1:
                w_i = buffer[:, epoch - 1] / buffer[:, epoch - 2]
                expected = (num_tasks * torch.softmax(w_i / T, dim=-1)).tolist()
            else:
                expected = [1.0] * num_tasks
            assert_close(step(method, losses), expected, rtol=1e-12)
            buffer[:, epoch] += torch.tensor(losses, dtype=torch.float64) / len(batches)
        method.end_epoch()


def test_warm_up_gives_weight_one_for_two_windows():
    method = DWA(window="step")
    assert method.needs is Needs.LOSSES
    assert step(method, [5.0, 1.0]) == [1.0, 1.0]
    assert step(method, [1.0, 1.0]) == [1.0, 1.0]
    assert step(method, [1.0, 1.0]) != [1.0, 1.0]  # 1/5 and 1/1: the first task fell faster


@given(positive_losses(max_tasks=8), positive_losses(max_tasks=8), st.floats(0.1, 100.0))
def test_weights_sum_to_the_task_count_and_follow_the_rates(last, before, temperature):
    n = min(len(last), len(before))
    last, before = last[:n], before[:n]
    weights = dwa_weights(last, before, temperature).tolist()
    assert math.fsum(weights) == pytest.approx(n, rel=1e-12)
    assert all(w > 0 for w in weights) or min(weights) == 0.0  # underflow only at extreme rates
    rates = [a / b for a, b in zip(last, before, strict=True)]
    for i in range(n):
        for j in range(n):
            if rates[i] > rates[j]:
                assert weights[i] >= weights[j]  # a task whose loss fell less weighs more


@given(positive_losses(max_tasks=6), st.floats(1e-3, 1e3))
def test_weights_do_not_change_when_a_task_loss_is_rescaled(losses, c):
    """Only ratios enter: a task's loss multiplied by a constant keeps its weights."""
    before = [2.0 * x for x in losses]
    scaled_last, scaled_before = [c * losses[0], *losses[1:]], [c * before[0], *before[1:]]
    assert_close(
        dwa_weights(scaled_last, scaled_before).tolist(),
        dwa_weights(losses, before).tolist(),
        rtol=1e-10,
    )


def test_equal_rates_give_equal_weights():
    assert_close(dwa_weights([1.0, 4.0, 9.0], [2.0, 8.0, 18.0]).tolist(), [1.0] * 3, rtol=1e-15)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_refuses_a_loss_that_is_not_positive_and_changes_nothing(bad):
    method = DWA()
    step(method, [1.0, 2.0])
    assert_refusal_changes_nothing(method, [1.0, bad], match="positive losses")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_refuses_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature)


def test_refuses_a_bad_window_and_end_epoch_on_step_windows():
    with pytest.raises(ValueError, match="window"):
        DWA(window="batch")
    with pytest.raises(RuntimeError, match="window='step'"):
        DWA(window="step").end_epoch()


def test_refuses_a_changed_task_count():
    method = DWA(window="step")
    step(method, [1.0, 1.0])
    with pytest.raises(ValueError, match="reset"):
        decide(method, [1.0, 1.0, 1.0])
    method.reset()
    assert step(method, [1.0, 1.0, 1.0]) == [1.0] * 3


def test_an_epoch_without_steps_changes_nothing():
    method = DWA()
    method.end_epoch()
    assert method.state_dict() == {"averages": [], "window_sum": None, "window_count": 0}


@pytest.mark.parametrize("window", ["epoch", "step"])
def test_resumes_bit_exactly(window):
    rows = random_losses(9, 3, seed=2)

    def build():
        return DWA(window=window)

    if window == "step":
        assert_resumes_bit_exactly(build, rows, at=4)
        return

    # Epochs of three steps; the checkpoint falls inside the second epoch.
    def run(method, rows, start):
        out = []
        for t, row in enumerate(rows, start):
            out.append(step(method, row))
            if t % 3 == 2:
                method.end_epoch()
        return out

    method = build()
    run(method, rows[:8], 0)  # epochs 0, 1 closed; epoch 2 holds steps 6 and 7
    checkpoint = method.state_dict()
    expected = run(method, rows[8:], 8)
    restored = build()
    restored.load_state_dict(checkpoint)
    assert run(restored, rows[8:], 8) == expected


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"averages": [[1.0]] * 3, "window_sum": None, "window_count": 0},
        {"averages": [[1.0, 2.0], [1.0]], "window_sum": None, "window_count": 0},
        {"averages": [[0.0, 1.0]], "window_sum": None, "window_count": 0},
        {"averages": [], "window_sum": [1.0], "window_count": -1},
    ],
)
def test_load_state_dict_refuses_bad_states_and_changes_nothing(state):
    method = DWA()
    step(method, [1.0, 2.0])
    before = method.state_dict()
    with pytest.raises(ValueError):
        method.load_state_dict(state)
    assert method.state_dict() == before
