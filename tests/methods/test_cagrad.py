"""CAGrad: the exact dual solution against torchjd (Clarabel), the official code (SLSQP) and the
primal problem it solves."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize
from torchjd.aggregation._cagrad import CAGradWeighting

from gradsurgery import _linalg
from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import _cagrad, cagrad_weights
from gradsurgery.methods.cagrad import CAGrad

from ._gramian_properties import direction_error, edit_last_row, jacobians, permutations
from ._jacobians import cases


def official_direction(J: torch.Tensor, c: float, rescale: int) -> torch.Tensor:
    """The official code's ``cagrad`` (Cranial-XIX/CAGrad, nyuv2/utils.py), on J itself."""
    grads = J.T  # [P, T] as the official code holds them
    GG = grads.t().mm(grads)
    T = J.shape[0]
    g0_norm = (GG.mean() + 1e-8).sqrt()
    x_start = np.ones(T) / T
    A = GG.numpy()
    coefficient = (c * g0_norm + 1e-8).item()

    def objective(x):
        return x @ A @ x_start + coefficient * np.sqrt(x @ A @ x + 1e-8)

    result = minimize(
        objective,
        x_start,
        bounds=[(0, 1)] * T,
        constraints={"type": "eq", "fun": lambda x: 1 - sum(x)},
    )
    gw = grads @ torch.from_numpy(result.x)
    g = grads.mean(1) + coefficient / (gw.norm() + 1e-8) * gw
    return g / (1.0, 1 + c**2, 1 + c)[rescale]


def worst_case_gain(J: torch.Tensor, d: torch.Tensor) -> float:
    return float((J @ d).min())


@pytest.mark.parametrize(("name", "J"), cases())
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9])
def test_agrees_with_torchjd(name, J, c):
    """torchjd solves the same dual with Clarabel (no rescale); it returns zero weights when
    the dual's g_w vanishes (where ours returns the projection of g_0 onto the dual cone)."""
    G = J @ J.T
    theirs = CAGradWeighting(c)(G)
    if float(theirs.abs().sum()) == 0:
        return
    ours = cagrad_weights(G, c, rescale=0)
    assert direction_error(J, ours, theirs) < 1e-4, name


@pytest.mark.parametrize(("name", "J"), [c for c in cases() if "random" in c[0] or "ill" in c[0]])
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_agrees_with_the_official_code(name, J, rescale):
    """SLSQP stops at its default tolerance: on well-conditioned gradients the directions agree
    to 2e-3 of the gradients' size; on ill-conditioned ones SLSQP may stop earlier, and then
    ours gains as much on the worst task (the official radius carries a 1e-8 guard, worth about
    1e-8 of gain)."""
    ours = J.T @ cagrad_weights(J @ J.T, 0.4, rescale=rescale)
    theirs = official_direction(J, 0.4, rescale)
    scale = float(J.norm(dim=1).max())
    if "random" in name:
        assert float((ours - theirs).norm()) < 2e-3 * scale, name
    assert worst_case_gain(J, ours) >= worst_case_gain(J, theirs) - 1e-6 * scale**2, name


@given(jacobians(), st.sampled_from([0, 1, 2]))
def test_c_zero_is_the_mean(J, rescale):
    G = J @ J.T
    T = J.shape[0]
    assert cagrad_weights(G, 0.0, rescale=rescale).tolist() == [1 / T] * T


@given(jacobians(full_rank=True, spread=1.0), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
def test_solves_the_primal_problem(J, c, seed):
    """d maximizes min_i g_i . d over the ball ||d - g_0|| <= c ||g_0||: it lies in the ball,
    and no other point of the ball (random ones, its boundary included) does better. (With
    linearly independent gradients 0 is not in their hull, so the dual's g_w is not zero.)"""
    G = J @ J.T
    d = J.T @ cagrad_weights(G, c, rescale=0)
    g0 = J.mean(dim=0)
    radius = c * float(g0.norm())
    scale = float(J.norm(dim=1).max())
    assert float((d - g0).norm()) <= radius + 1e-9 * scale
    best = worst_case_gain(J, d)
    rng = np.random.default_rng(seed)
    for _ in range(50):
        u = torch.from_numpy(rng.standard_normal(J.shape[1]))
        other = g0 + radius * rng.uniform() ** (1 / J.shape[1]) * u / u.norm()
        assert worst_case_gain(J, other) <= best + 1e-8 * scale**2


def best_worst_case_gain(J: torch.Tensor, c: float) -> float:
    """The primal problem's value, max min_i g_i . d over ||d - g_0|| <= c ||g_0||, by a conic
    solver (Clarabel, through cvxpy): independent of the dual that gradsurgery solves. Solved
    at unit scale (the value scales as the gradients squared), since the solver's tolerances
    are absolute."""
    scale = float(J.norm(dim=1).max())
    if scale == 0:
        return 0.0
    A = J.numpy() / scale
    g0 = A.mean(axis=0)
    d, t = cp.Variable(A.shape[1]), cp.Variable()
    constraints = [A @ d >= t, cp.norm(d - g0) <= c * float(np.linalg.norm(g0))]
    problem = cp.Problem(cp.Maximize(t), constraints)
    problem.solve(cp.CLARABEL)
    return float(problem.value) * scale**2


@st.composite
def jacobians_with_zero_in_the_hull(draw) -> torch.Tensor:
    """Gradients with 0 in their convex hull: a zero gradient, an opposed pair, or a last
    gradient that is a negative combination of some others. Then no d improves every task,
    the worst-task value is at most 0, and the dual's g_w = 0 is feasible (value 0)."""
    num_tasks = draw(st.integers(2, 10))
    num_params = draw(st.integers(1, num_tasks + 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    J = rng.standard_normal((num_tasks, num_params))
    J *= 10.0 ** rng.uniform(-1, 1, size=(num_tasks, 1))
    edit = draw(st.sampled_from(["zero", "oppose", "negative combination"]))
    if edit == "zero":
        J[-1] = 0.0
    elif edit == "oppose":
        J[-1] = -rng.uniform(0.1, 10) * J[0]
    else:
        mixing = rng.uniform(0, 1, size=num_tasks - 1) * (rng.uniform(size=num_tasks - 1) < 0.5)
        mixing[0] += 0.1
        J[-1] = -mixing @ J[:-1]
    return torch.from_numpy(J)


@given(jacobians_with_zero_in_the_hull(), st.sampled_from([0.1, 0.4, 0.9, 5.0]))
def test_solves_the_primal_problem_with_zero_in_the_hull(J, c):
    """Where g_w = 0 solves the dual, every d of the ball with J d >= 0 is a best one, and the
    mean gradient may not be one of them (it can conflict with a task while another point of
    the ball conflicts with none); elsewhere the dual's optimum has g_w != 0. Either way d
    lies in the ball and reaches the conic solver's worst-task value."""
    d = J.T @ cagrad_weights(J @ J.T, c, rescale=0)
    g0 = J.mean(dim=0)
    scale = float(J.norm(dim=1).max())
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-7) + 1e-9 * scale
    assert worst_case_gain(J, d) >= best_worst_case_gain(J, c) - 1e-6 * scale**2


def spread_norm_jacobian(seed: int, index: int) -> torch.Tensor:
    """Case ``index`` of a scan of random Jacobians whose rows' norms lie up to six decades
    apart, a quarter each with a zero, a repeated and an opposed last row (regenerated from the
    seed, not stored)."""
    rng = np.random.default_rng(seed)
    for _ in range(index + 1):
        num_tasks = int(rng.integers(2, 11))
        num_params = int(rng.integers(1, num_tasks + 9))
        J = rng.standard_normal((num_tasks, num_params))
        J *= 10.0 ** rng.uniform(-3, 3, (num_tasks, 1))
        edit_last_row(J, str(rng.choice(["zero", "repeat", "oppose", "none"])))
    return torch.from_numpy(J)


@pytest.mark.parametrize("numpy_path", [False, True])
@pytest.mark.parametrize(
    ("seed", "index"), [(1, 95), (1, 292), (1, 303), (1, 314), (2, 8), (4, 96), (5, 325)]
)
def test_reaches_the_primal_value_with_norms_decades_apart(seed, index, numpy_path, monkeypatch):
    """With c = 5 and gradient norms decades apart, the dual's root s is small and the update
    g_0 + g_w / s magnifies what the dual's optimality test tolerates by 1 / s: a task just
    off the support would end below the others. In these cases (T = 4 to 10) the worst
    task's value reaches the conic solver's to 1e-8 of the squared scale, on both paths."""
    if numpy_path:
        for module in (_cagrad, _linalg):
            monkeypatch.setattr(module, "_PYTHON_MAX_SIZE", 0)
    J = spread_norm_jacobian(seed, index)
    d = J.T @ cagrad_weights(J @ J.T, 5.0, rescale=0)
    g0 = J.mean(dim=0)
    scale = float(J.norm(dim=1).max()) ** 2
    assert float((d - g0).norm()) <= 5.0 * float(g0.norm()) * (1 + 1e-7)
    assert worst_case_gain(J, d) >= best_worst_case_gain(J, 5.0) - 1e-8 * scale


def test_zero_in_the_hull_moves_the_mean_off_the_conflict():
    """g_1 = -g_2 and g_4 . g_0 < 0: the mean conflicts with task 4, while the ball holds the
    projection (0, 2, 1) of g_0 = (0, 2.375, 0.25) onto {d : J d >= 0}, which conflicts with no
    task: worst-task value 0, not the mean's -0.9375."""
    J = torch.tensor(
        [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, -0.5, 1.0]],
        dtype=torch.float64,
    )
    assert worst_case_gain(J, J.mean(dim=0)) == -0.9375
    weights = cagrad_weights(J @ J.T, 0.4, rescale=0)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.25, 0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(J.T @ weights, torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64))


def test_zero_gradient_beside_a_conflict_free_mean():
    """A zero gradient and a mean that conflicts with no other task: g_w = 0 for every s, the
    face guesses have no positive root, and the bracketing's minimum-norm points at the
    smallest s are rounding noise, whose ratio to s once faked a bracket (no convergence)."""
    J = torch.tensor(
        [
            [-2.0338484992939554, 3.0153717101007995, -0.08670333160822118, -0.6492406152320114],
            [-0.3807637157708959, 0.6848063976315283, -0.28857270285591646, 0.4724614310092531],
            [2.5634783957024663, 4.926682235459804, 9.963653537916349, -5.491128180721562],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    assert (J @ J.mean(dim=0) >= 0).all()
    weights = cagrad_weights(J @ J.T, 0.4, rescale=0)
    torch.testing.assert_close(weights, torch.full((4,), 0.25, dtype=torch.float64))


@given(jacobians().flatmap(lambda J: st.tuples(st.just(J), permutations(J.shape[0]))))
def test_permuting_the_tasks_permutes_the_direction(case):
    J, permutation = case
    G = J @ J.T
    d = J.T @ cagrad_weights(G)
    d_permuted = J[permutation].T @ cagrad_weights(G[permutation][:, permutation])
    assert float((d - d_permuted).norm()) <= 1e-6 * float(J.norm(dim=1).max())


@given(jacobians(), st.floats(1e-4, 1e4))
def test_scaling_the_gradients_scales_the_direction(J, factor):
    G = J @ J.T
    d = J.T @ cagrad_weights(G)
    d_scaled = (factor * J).T @ cagrad_weights(factor**2 * G)
    assert float((d_scaled - factor * d).norm()) <= 1e-6 * factor * float(J.norm(dim=1).max())


def test_rescale_options_divide_the_unscaled_weights():
    G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
    plain = cagrad_weights(G, 0.5, rescale=0)
    torch.testing.assert_close(cagrad_weights(G, 0.5, rescale=1), plain / 1.25)
    torch.testing.assert_close(cagrad_weights(G, 0.5, rescale=2), plain / 1.5)


def test_degenerate_cases():
    # T = 1: the best point of the ball is (1 + c) g.
    torch.testing.assert_close(
        cagrad_weights(torch.ones(1, 1), 0.4, rescale=0), torch.tensor([1.4], dtype=torch.float64)
    )
    assert cagrad_weights(torch.zeros(3, 3), rescale=0).tolist() == [1 / 3] * 3
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # g_0 = 0: nothing to improve on
    assert cagrad_weights(opposed, rescale=0).tolist() == [0.5, 0.5]
    # 0 in the hull and g_0 orthogonal to the opposed pair: g_w = 0, the mean direction.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    d = J.T @ cagrad_weights(J @ J.T, 0.4, rescale=0)
    torch.testing.assert_close(d, J.mean(dim=0))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"c": -0.1}, "c must be"), ({"c": float("inf")}, "c must be"), ({"rescale": 3}, "rescale")],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        cagrad_weights(torch.eye(2), **kwargs)
    with pytest.raises(ValueError, match=error):
        CAGrad(**kwargs)


def test_method():
    method = CAGrad(0.5, rescale=2)
    assert method.needs == Needs.GRAMIAN
    stats = TaskStats(losses=(1.0, 2.0), gramian_rows=[[1.0, -0.5], [-0.5, 4.0]])
    assert method.decide(stats).weights == cagrad_weights(stats.gramian, 0.5, rescale=2).tolist()
    assert repr(method) == "CAGrad(c=0.5, rescale=2)"
