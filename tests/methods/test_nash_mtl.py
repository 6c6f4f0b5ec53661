"""Nash-MTL: the bargaining equations G a = 1 / a, against torchjd's (the authors') CCP solver."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation import NashMTL as TorchjdNashMTL

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import nash_mtl_weights
from gradsurgery.functional._nash_mtl import NashMTLNoSolutionError, solve_bargaining
from gradsurgery.methods.nash_mtl import NashMTL

from ._gramian_properties import jacobians, permutations, relative_error
from ._jacobians import cases


def bargaining_residual(G: torch.Tensor, a: torch.Tensor) -> float:
    """Largest |a_i (G a)_i - 1|: zero at the Nash bargaining solution."""
    return float((a * (G @ a) - 1).abs().max())


def torchjd_weights(J: torch.Tensor, max_norm: float) -> torch.Tensor:
    aggregator = TorchjdNashMTL(n_tasks=J.shape[0], max_norm=max_norm, optim_niter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy: "not DPP", "may be inaccurate"
        return aggregator.weighting(J)


def test_agrees_with_torchjd_where_it_converges():
    """torchjd runs the authors' sequence of convex problems (ECOS), 20 at most from a = 1: on
    well-scaled gradients it reaches the solution, and then the weights agree. (The clip is
    the same formula on both sides: tested on ours below.)"""
    compared, worst = 0, 0.0
    for name, J in cases(pareto_stationary=False):
        G = J @ J.T
        ours = nash_mtl_weights(G, max_norm=0.0)
        assert bargaining_residual(G, ours) < 1e-9, name
        theirs = torchjd_weights(J, 0.0)
        if bargaining_residual(G, theirs) > 1e-5:
            continue  # torchjd stopped before the solution
        compared += 1
        worst = max(worst, relative_error(ours, theirs))
    assert compared >= 10
    assert worst < 1e-5


def test_converges_where_torchjd_does_not():
    """On an ill-conditioned Gramian torchjd's 20 iterations end far from G a = 1 / a."""
    J = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-3, 0.0], [0.5, 0.0, 1e2]], dtype=torch.float64)
    G = J @ J.T
    assert bargaining_residual(G, nash_mtl_weights(G, max_norm=0.0)) < 1e-9


@given(jacobians(full_rank=True))
def test_bargaining_equations_hold(J):
    G = J @ J.T
    solution = solve_bargaining(G.numpy(), 20, None)
    assert solution.converged
    a = torch.from_numpy(solution.weights)
    assert (a > 0).all() and bargaining_residual(G, a) < 1e-8


@given(jacobians(full_rank=True), st.floats(0.1, 10.0))
def test_update_norm_is_clipped(J, max_norm):
    """At the solution ||J^T a||^2 = sum_i a_i (G a)_i = T; the clip scales it to max_norm."""
    G = J @ J.T
    a = nash_mtl_weights(G, max_norm=max_norm)
    norm = math.sqrt(float(a @ G @ a))
    assert norm == pytest.approx(min(max_norm, math.sqrt(J.shape[0])), rel=1e-8)


@given(jacobians(full_rank=True).flatmap(lambda J: st.tuples(st.just(J), permutations(J.shape[0]))))
def test_permuting_the_tasks_permutes_the_weights(case):
    J, permutation = case
    G = J @ J.T
    permuted = nash_mtl_weights(G[permutation][:, permutation], max_norm=0.0)
    torch.testing.assert_close(
        permuted, nash_mtl_weights(G, max_norm=0.0)[permutation], rtol=1e-7, atol=0
    )


@given(jacobians(full_rank=True), st.floats(1e-3, 1e3))
def test_scaling_the_gradients_scales_the_weights_inversely(J, factor):
    """a(k J) = a(J) / k: the update J^T a keeps its norm sqrt(T)."""
    G = J @ J.T
    torch.testing.assert_close(
        nash_mtl_weights(factor**2 * G, max_norm=0.0),
        nash_mtl_weights(G, max_norm=0.0) / factor,
        rtol=1e-7,
        atol=0,
    )


def test_zero_gradient_gets_zero_weight_and_the_others_bargain():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    a = nash_mtl_weights(J @ J.T, max_norm=0.0)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert nash_mtl_weights(torch.zeros(2, 2)).tolist() == [0.0, 0.0]


_OPPOSED = np.array([[1.0, -1.0], [-1.0, 1.0]])  # g_1 = -g_2: g_1 + g_2 = 0
_NEARLY_DEPENDENT = (lambda J: J @ J.T)(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0 + 1e-9]]))


@pytest.mark.parametrize("G", [_OPPOSED, _NEARLY_DEPENDENT], ids=["opposed", "nearly-dependent"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_pareto_stationary_gradients_raise_a_clear_error(G, warm):
    """No positive solution of G a = 1 / a: a clear error, never a singular-matrix crash nor
    the huge last iterate (whose update would be rounding noise times 1e6). The warm start from
    large weights is how a training run reaches the singular Hessian."""
    start = np.full(G.shape[0], 1e6) if warm else None
    with pytest.raises(NashMTLNoSolutionError, match="Pareto-stationary") as raised:
        solve_bargaining(G, 20, start)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(ValueError, match="no positive solution of G a = 1 / a"):
        nash_mtl_weights(torch.from_numpy(G), warm_start=None if start is None else start)


def test_method_falls_back_to_the_previous_weights_when_there_is_no_solution():
    method = NashMTL(max_norm=0.0)
    good = method.decide(TaskStats((1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 4.0]]))
    assert good.extras["updated"] and not good.extras["fallback"]
    method.commit(good.state)
    stuck = method.decide(TaskStats((1.0, 1.0), gramian_rows=_OPPOSED.tolist()))
    assert stuck.extras["fallback"] and not stuck.extras["updated"]
    assert "Pareto-stationary" in stuck.extras["reason"]
    assert stuck.weights == pytest.approx(good.weights)
    assert stuck.state == (2, good.state[1])  # the step counts; the weights are kept
    method.commit(stuck.state)
    assert method.state_dict() == {"step": 2, "weights": list(good.state[1])}


def test_method_fallback_clips_with_the_current_gradients():
    method = NashMTL(max_norm=1.0)
    method.commit(method.decide(TaskStats((1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 4.0]])).state)
    G = 16.0 * _OPPOSED  # the kept weights (1, 1/2) give ||J^T a|| = 2 here
    stuck = method.decide(TaskStats((1.0, 1.0), gramian_rows=G.tolist()))
    assert stuck.extras["fallback"]
    assert stuck.weights == pytest.approx([0.5, 0.25], rel=1e-12)


def test_fresh_method_raises_and_changes_nothing_without_previous_weights():
    method = NashMTL()
    with pytest.raises(NashMTLNoSolutionError, match="Pareto-stationary"):
        method.decide(TaskStats((1.0, 1.0), gramian_rows=_OPPOSED.tolist()))
    assert method.state_dict() == {"step": 0, "weights": None}


def test_warm_start_reaches_the_same_weights_in_fewer_iterations():
    J = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = (J @ J.T).numpy()
    cold = solve_bargaining(G, 20, None)
    warm = solve_bargaining(G * 1.01, 20, cold.weights)
    reference = solve_bargaining(G * 1.01, 50, None)
    np.testing.assert_allclose(warm.weights, reference.weights, rtol=1e-10)
    assert warm.iterations < cold.iterations


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_norm": -1.0}, "max_norm"),
        ({"optim_niter": 0}, "optim_niter"),
        ({"warm_start": [1.0]}, "one entry per task"),
    ],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        nash_mtl_weights(torch.eye(2), **kwargs)


def stats(rows: list[list[float]]) -> TaskStats:
    return TaskStats(losses=tuple(1.0 for _ in rows), gramian_rows=rows)


def test_method_reuses_the_weights_between_updates():
    method = NashMTL(max_norm=0.0, update_weights_every=2)
    assert method.needs == Needs.GRAMIAN
    first = method.decide(stats([[1.0, 0.0], [0.0, 4.0]]))
    assert first.extras["updated"] and first.extras["converged"]
    method.commit(first.state)
    second = method.decide(stats([[4.0, 0.0], [0.0, 1.0]]))  # step 1: reuse
    assert not second.extras["updated"] and second.weights == first.weights
    method.commit(second.state)
    third = method.decide(stats([[4.0, 0.0], [0.0, 1.0]]))  # step 2: solve again
    assert third.extras["updated"]
    torch.testing.assert_close(
        torch.tensor(third.weights), torch.tensor([0.5, 1.0]), rtol=1e-9, atol=0
    )


def test_method_clips_every_step_with_the_current_gradients():
    method = NashMTL(max_norm=1.0, update_weights_every=3)
    decision = method.decide(stats([[1.0, 0.0], [0.0, 4.0]]))
    method.commit(decision.state)
    reused = method.decide(stats([[4.0, 0.0], [0.0, 16.0]]))  # gradients twice as long
    G = torch.tensor([[4.0, 0.0], [0.0, 16.0]], dtype=torch.float64)
    w = torch.tensor(reused.weights, dtype=torch.float64)
    assert float(w @ G @ w) == pytest.approx(1.0)


def test_decide_changes_nothing_until_commit():
    method = NashMTL()
    before = method.state_dict()
    method.decide(stats([[1.0, 0.2], [0.2, 1.0]]))
    assert method.state_dict() == before


def test_state_round_trip_and_reset():
    method = NashMTL(update_weights_every=2)
    method.commit(method.decide(stats([[1.0, 0.2], [0.2, 1.0]])).state)
    saved = method.state_dict()
    restored = NashMTL(update_weights_every=2)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    following = stats([[2.0, 0.1], [0.1, 1.0]])
    assert restored.decide(following).weights == method.decide(following).weights
    method.reset()
    assert method.state_dict() == {"step": 0, "weights": None}


@pytest.mark.parametrize(
    "bad",
    [
        {"step": 1},
        {"step": -1, "weights": None},
        {"step": 1.5, "weights": None},
        {"step": 1, "weights": [1.0, float("nan")]},
        {"step": 1, "weights": [-1.0, 1.0]},
        {"step": 1, "weights": None, "extra": 0},
    ],
)
def test_bad_state_is_refused_and_changes_nothing(bad):
    method = NashMTL()
    method.commit(method.decide(stats([[1.0, 0.2], [0.2, 1.0]])).state)
    before = method.state_dict()
    with pytest.raises(ValueError):
        method.load_state_dict(bad)
    assert method.state_dict() == before


def test_a_changed_task_count_is_refused():
    method = NashMTL()
    method.commit(method.decide(stats([[1.0, 0.2], [0.2, 1.0]])).state)
    with pytest.raises(ValueError, match="reset"):
        method.decide(stats([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_constructor_checks_and_repr():
    with pytest.raises(ValueError, match="update_weights_every"):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=float("nan"))
    assert repr(NashMTL()) == "NashMTL(max_norm=1.0, update_weights_every=1, optim_niter=20)"


def test_a_warm_start_from_an_unrelated_gramian_costs_no_extra_steps():
    """The previous step's weights compete with the default start: from the solution of an
    unrelated Gramian, Newton takes no more steps in all than from the default start, and
    reaches the same weights."""
    rng = np.random.default_rng(0)
    warm_steps = cold_steps = 0
    for _ in range(16):
        J1, J2 = (rng.standard_normal((3, 50)) * 10.0 ** rng.uniform(-1, 1, (3, 1)) for _ in "ab")
        previous = solve_bargaining(J1 @ J1.T, 20, None).weights
        cold = solve_bargaining(J2 @ J2.T, 20, None)
        warm = solve_bargaining(J2 @ J2.T, 20, previous)
        np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-9)
        warm_steps, cold_steps = warm_steps + warm.iterations, cold_steps + cold.iterations
    assert warm_steps <= cold_steps
