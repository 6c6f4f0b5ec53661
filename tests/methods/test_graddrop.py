"""GradDrop: against torchjd and LibMTL's sign dropout, and the sign-purity property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation import GradDrop as TorchjdGradDrop

from gradsurgery._jacobian import TaskJacobian
from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import graddrop
from gradsurgery.methods.graddrop import GradDrop

from ._jacobians import cases, random_jacobian
from ._pipeline import step_through_optimizer


def libmtl_graddrop(per_grads: torch.Tensor, leak: float, uniform: torch.Tensor) -> torch.Tensor:
    """LibMTL's GradDrop.backward (LibMTL/weighting/GradDrop.py) for a representation of
    positive inputs and batch size one (``inputs.sign() == 1``), with ``U`` given."""
    grads = per_grads
    P = 0.5 * (1 + grads.sum(0) / (grads.abs().sum(0) + 1e-7))
    M = P.gt(uniform).unsqueeze(0) * grads.gt(0) + P.lt(uniform).unsqueeze(0) * grads.lt(0)
    return (per_grads * (leak + (1 - leak) * M)).sum(0)


@pytest.mark.parametrize("leak", [0.0, 0.3, "per-task"])
@pytest.mark.parametrize(("name", "J"), cases())
def test_agrees_with_torchjd(name, J, leak):
    num_tasks = J.shape[0]
    leaks = torch.linspace(0, 1, num_tasks, dtype=torch.float64) if leak == "per-task" else None
    if leak == 0.3:
        leaks = torch.full((num_tasks,), 0.3, dtype=torch.float64)
    torch.manual_seed(7)  # torchjd draws U from the global generator
    theirs = TorchjdGradDrop(leak=leaks)(J)
    ours = graddrop(
        J,
        leak=0.0 if leaks is None else leaks.tolist(),
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12 * float(J.abs().max()))


@pytest.mark.parametrize("leak", [0.0, 0.5])
def test_agrees_with_libmtl(leak):
    # LibMTL adds 1e-7 to the purity's denominator; at unit scale that moves no decision.
    J = random_jacobian(5, 3, num_params=2000)
    uniform = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        graddrop(J, leak=leak, uniform=uniform), libmtl_graddrop(J, leak, uniform)
    )


def test_leak_one_is_the_sum_and_no_conflict_keeps_everything():
    J = random_jacobian(4, 0)
    torch.testing.assert_close(graddrop(J, leak=1.0), J.sum(0))
    torch.testing.assert_close(graddrop(J.abs()), J.abs().sum(0))
    torch.testing.assert_close(graddrop(-J.abs()), -J.abs().sum(0))


def test_a_draw_equal_to_the_purity_keeps_the_negative_entries():
    # Purities 0 (all negative), 1/2 and 1 (all positive); U equal to the first two. The
    # paper's masks P > U and P < U would drop both signs there (0 and 0 for 2 and 3).
    J = torch.tensor([[-1.0, 1.0, 1.0], [-2.0, -1.0, 2.0]], dtype=torch.float64)
    uniform = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert graddrop(J, uniform=uniform).tolist() == [-3.0, -1.0, 3.0]
    assert graddrop(J, leak=[0.5, 0.0], uniform=uniform).tolist() == [-3.0, -0.5, 3.0]


def test_zero_columns_give_zero():
    J = random_jacobian(3, 0)
    J[:, :5] = 0.0
    assert graddrop(J)[:5].tolist() == [0.0] * 5


def test_half_precision_keeps_its_dtype():
    J = random_jacobian(3, 0).half()
    assert graddrop(J).dtype == torch.float16


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"leak": -0.1}, ValueError, "leak"),
        ({"leak": [0.1, 0.2]}, ValueError, "leak"),
        ({"leak": float("nan")}, ValueError, "leak"),
        ({"uniform": torch.zeros(3)}, ValueError, "uniform"),
    ],
)
def test_bad_input_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        graddrop(random_jacobian(3, 0), **kwargs)
    with pytest.raises(ValueError, match="grads"):
        graddrop(torch.ones(4))


jacobians = st.builds(
    random_jacobian, st.integers(1, 6), st.integers(0, 2**31 - 1), st.integers(8, 32)
)


@given(jacobians, st.integers(0, 2**31 - 1))
def test_every_coordinate_keeps_one_sign(J, seed):
    update = graddrop(J, generator=torch.Generator().manual_seed(seed))
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    kept = torch.isclose(update, positive, rtol=1e-12, atol=0) | torch.isclose(
        update, negative, rtol=1e-12, atol=0
    )
    assert kept.all()


@given(jacobians, st.randoms(use_true_random=False))
def test_permuting_the_tasks_changes_nothing(J, rng):
    permutation = list(range(J.shape[0]))
    rng.shuffle(permutation)
    uniform = torch.rand(J.shape[1], dtype=torch.float64)
    torch.testing.assert_close(
        graddrop(J[permutation], uniform=uniform), graddrop(J, uniform=uniform)
    )


@given(jacobians, st.floats(-6, 6))
def test_scaling_the_gradients_scales_the_update(J, log_scale):
    s = 10.0**log_scale
    uniform = torch.rand(J.shape[1], dtype=torch.float64)
    torch.testing.assert_close(graddrop(s * J, uniform=uniform), s * graddrop(J, uniform=uniform))


def test_the_positive_sign_survives_with_probability_purity():
    J = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)  # purity 0.75
    draws = 4000
    updates = graddrop(J.expand(2, draws), generator=torch.Generator().manual_seed(0))
    frequency = float((updates > 0).double().mean())
    assert abs(frequency - 0.75) < 4 * (0.75 * 0.25 / draws) ** 0.5


def jacobian_of(J: torch.Tensor, numels) -> TaskStats:
    return TaskStats(losses=(1.0,) * J.shape[0], jacobian=TaskJacobian(J, None, numels))


def test_decide_draws_as_the_functional_and_commits_the_generator():
    J = random_jacobian(3, 4)
    method = GradDrop(leak=0.2, generator=torch.Generator().manual_seed(9))
    decision = method.decide(jacobian_of(J, [10, 14]))
    expected = graddrop(J, leak=0.2, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(torch.cat(decision.direction), expected)
    assert [d.numel() for d in decision.direction] == [10, 14]
    assert decision.weights == [1.0, 1.0, 1.0]
    assert method.needs is Needs.JACOBIAN and method.unshared == "sum"
    untouched = torch.Generator().manual_seed(9).get_state()
    assert torch.equal(method.generator.get_state(), untouched)
    method.commit(decision.state)
    assert not torch.equal(method.generator.get_state(), untouched)
    assert repr(method) == "GradDrop(leak=0.2)"


def test_unshared_parameters_get_the_sum_and_no_draws():
    J = random_jacobian(3, 4)
    method = GradDrop(generator=torch.Generator().manual_seed(9))
    stats = TaskStats(
        losses=(1.0, 1.0, 1.0),
        jacobian=TaskJacobian(J, None, [10, 4, 10]),
        shared=np.array([True, False, True]),
    )
    direction = method.decide(stats).direction
    torch.testing.assert_close(direction[1], J[:, 10:14].sum(0))
    columns = list(range(10)) + list(range(14, 24))
    expected = graddrop(J[:, columns], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(torch.cat([direction[0], direction[2]]), expected)


def test_state_round_trip_and_bad_state():
    J = random_jacobian(2, 4)
    method = GradDrop(generator=torch.Generator().manual_seed(1))
    method.commit(method.decide(jacobian_of(J, [24])).state)
    restored = GradDrop(generator=torch.Generator().manual_seed(2))
    restored.load_state_dict(method.state_dict())
    assert torch.equal(
        torch.cat(restored.decide(jacobian_of(J, [24])).direction),
        torch.cat(method.decide(jacobian_of(J, [24])).direction),
    )
    before = method.state_dict()["generator"]
    for bad in [{}, {"generator": torch.zeros(2, dtype=torch.uint8)}, {"generator": 1, "x": 2}]:
        with pytest.raises(ValueError, match="GradDrop"):
            method.load_state_dict(bad)
    assert torch.equal(method.state_dict()["generator"], before)


def test_leak_per_task_must_match_the_task_count():
    method = GradDrop(leak=[0.1, 0.2])
    with pytest.raises(ValueError, match="2 entries, got 3 tasks"):
        method.decide(jacobian_of(random_jacobian(3, 0), [24]))
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=2.0)


def test_through_the_optimizer():
    method = GradDrop(generator=torch.Generator().manual_seed(4))
    J, shared_grad, head_grads, expected_heads = step_through_optimizer(method)
    expected = graddrop(J, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(shared_grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grads, [tuple(g) for g in expected_heads])
    assert not torch.equal(
        method.generator.get_state(), torch.Generator().manual_seed(4).get_state()
    )  # committed
