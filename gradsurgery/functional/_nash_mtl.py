"""Nash-MTL: the Nash bargaining solution of the tasks, ``G a = 1 / a``."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._linalg import (
    _PYTHON_MAX_SIZE,
    as_gramian,
    as_task_vector,
    check_number,
    check_positive_int,
    solve_psd_block,
)

__all__ = ["NashMTLNoSolutionError", "nash_mtl_weights"]

# Newton's decrement squared below which the bargaining equations hold to rounding.
_DECREMENT_TOLERANCE = 1e-20
# Largest weight (on the normalized Gramian) the solver accepts: beyond it the barrier term
# 1 / alpha^2 of the Hessian falls below rounding against the Gramian's unit-norm entries, so the
# Hessian is numerically singular and the Newton step meaningless.
_LARGEST_WEIGHT = 1.0 / math.sqrt(np.finfo(np.float64).eps)
# A unit nonnegative combination u of the gradients with u^T G_n u at most this (G_n of unit
# Frobenius norm) counts as zero: the gradients are Pareto-stationary to working precision.
_STATIONARY_TOLERANCE = math.sqrt(np.finfo(np.float64).eps)


class NashMTLNoSolutionError(ValueError):
    """The bargaining equations ``G a = 1 / a`` have no positive solution: the task gradients
    are (close to) Pareto-stationary."""


class NashSolution(NamedTuple):
    """The bargaining weights before clipping, and how the solver ended."""

    weights: np.ndarray
    converged: bool
    iterations: int


def nash_mtl_weights(
    gramian: Tensor,
    *,
    max_norm: float = 1.0,
    optim_niter: int = 20,
    warm_start: Tensor | None = None,
) -> Tensor:
    """Nash-MTL's task weights (Navon et al. 2022, *Multi-Task Learning as a Bargaining Game*).

    The weights ``a > 0`` solve the bargaining equations ``G a = 1 / a`` (elementwise): every
    task gets the same "utility" ``a_i (g_i . d) = 1`` from ``d = J^T a``. They are the unique
    minimizer of the strictly convex ``a^T G a / 2 - sum_i log a_i``, found by Newton steps
    with a backtracking line search (the function is self-concordant: the convergence is
    global, and quadratic near the solution), on the Gramian normalized by its Frobenius norm
    as in the authors' code. Then, as the authors clip the shared gradient, the weights are
    scaled so that ``||J^T a|| <= max_norm``.

    Tasks whose gradient is zero can gain nothing: they get weight 0 and the others bargain.
    When no solution exists (a nonnegative combination of the gradients is zero, e.g. an
    exactly opposed pair), Newton's iterates grow without bound until the Hessian is singular:
    this raises ``NashMTLNoSolutionError`` rather than return an arbitrary iterate, whose
    update ``J^T a`` would be rounding noise amplified by the huge weights.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.
    max_norm : float
        Largest norm of the update ``J^T a``; ``0`` disables the clipping (authors: 1.0).
    optim_niter : int
        Most Newton iterations (the authors' ``optim_niter`` bounds their convex-concave
        iterations; default 20 as theirs).
    warm_start : Tensor, optional
        ``[T]`` positive weights to start from, e.g. the previous step's (before clipping):
        Newton starts from it or from the default start, whichever (scaled to its best
        multiple) has the lower objective. The solution does not depend on it.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Raises
    ------
    ValueError
        ``NashMTLNoSolutionError``, when ``G a = 1 / a`` has no positive solution: the
        gradients are (close to) Pareto-stationary, some nonnegative combination of them is
        zero (e.g. two exactly opposite gradients), so no update improves every task. A plain
        ``ValueError`` on a bad Gramian or hyper-parameter.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import nash_mtl_weights
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> a = nash_mtl_weights(G, max_norm=0.0)
    >>> a
    tensor([1.0000, 0.5000], dtype=torch.float64)
    >>> a * (G @ a)  # G a = 1 / a
    tensor([1., 1.], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    max_norm = check_number(max_norm, "max_norm")
    optim_niter = check_positive_int(optim_niter, "optim_niter")
    start = None
    if warm_start is not None:
        start = as_task_vector(warm_start, G.shape[0], "warm_start")
    solution = solve_bargaining(G, optim_niter, start)
    return torch.from_numpy(clip_weights(G, solution.weights, max_norm))


def solve_bargaining(G: np.ndarray, max_iter: int, start: np.ndarray | None) -> NashSolution:
    """``a > 0`` with ``G a = 1 / a`` on the tasks with a nonzero gradient (0 elsewhere).

    Raises ``NashMTLNoSolutionError`` when the gradients are Pareto-stationary: the
    iterates blow up (non-finite, beyond ``_LARGEST_WEIGHT``, or a singular Hessian), or the
    solver ends unconverged along a nonnegative combination of the gradients that is zero to
    working precision."""
    num_tasks = G.shape[0]
    if num_tasks <= _PYTHON_MAX_SIZE:
        return _solve_bargaining_small(G.tolist(), max_iter, None if start is None else start)
    weights = np.zeros(num_tasks)
    active = np.flatnonzero(G.diagonal() > 0)
    if active.size == 0:
        return NashSolution(weights, True, 0)
    sub = G[np.ix_(active, active)]
    frobenius = float(np.linalg.norm(sub))
    normalized = sub / frobenius  # the authors' normalization: conditioning only
    # a_i = 1 / ||g_i|| solves the equations without the cross terms; the warm start, when
    # given, competes with it. Each is scaled to its best multiple (the minimizer along its
    # ray) and Newton starts from the lower objective: a start from a Gramian unlike this one
    # would cost damped steps (twice as many on unrelated Gramians), a close one saves them.
    starts = [1.0 / np.sqrt(normalized.diagonal())]
    if start is not None and (start[active] > 0).all():
        starts.append(start[active] * math.sqrt(frobenius))
    alpha = min(
        (_best_multiple(normalized, point) for point in starts),
        key=lambda point: _objective(normalized, point),
    )
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        gradient = normalized @ alpha - 1.0 / alpha
        hessian = normalized + np.diag(1.0 / alpha**2)
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            raise _no_solution(iterations, "the Newton system is singular") from None
        decrement_squared = float(gradient @ step)
        if not math.isfinite(decrement_squared):
            raise _no_solution(iterations, "the Newton step is not finite")
        if decrement_squared < _DECREMENT_TOLERANCE:
            converged = True
            break
        alpha = _line_search(normalized, alpha, step, decrement_squared)
        if not np.isfinite(alpha).all() or float(alpha.max()) > _LARGEST_WEIGHT:
            raise _no_solution(iterations, "the weights grow without bound")
    if not converged:
        direction = alpha / float(np.linalg.norm(alpha))
        if float(direction @ normalized @ direction) <= _STATIONARY_TOLERANCE:
            raise _no_solution(iterations, "the weights grow along a zero combination")
    # a solves G_n a_n = 1 / a_n for G_n = G / f; then a = a_n / sqrt(f) solves G a = 1 / a.
    weights[active] = alpha / math.sqrt(frobenius)
    return NashSolution(weights, converged, iterations)


def _solve_bargaining_small(
    G: list[list[float]], max_iter: int, start: np.ndarray | None
) -> NashSolution:
    """:func:`solve_bargaining` on Python floats, for at most ``_PYTHON_MAX_SIZE`` tasks: the
    same steps, without NumPy's per-call cost on 3 x 3 arrays."""
    num_tasks = len(G)
    active = [i for i in range(num_tasks) if G[i][i] > 0]
    if not active:
        return NashSolution(np.zeros(num_tasks), True, 0)
    size = len(active)
    sub = [[G[i][j] for j in active] for i in active]
    frobenius = math.sqrt(sum([value * value for row in sub for value in row]))
    normalized = [[value / frobenius for value in row] for row in sub]
    starts = [[1.0 / math.sqrt(normalized[k][k]) for k in range(size)]]  # as in solve_bargaining
    if start is not None and all(start[i] > 0 for i in active):
        starts.append([float(start[i]) * math.sqrt(frobenius) for i in active])
    best = math.inf
    for point in starts:
        curvature = _quadratic(normalized, point)
        if curvature > 0:
            point = [value * math.sqrt(size / curvature) for value in point]
            curvature = float(size)
        value = 0.5 * curvature - sum(map(math.log, point))
        if value < best:
            alpha, best = point, value
    indices = list(range(size))
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        gradient = [
            sum(map(float.__mul__, row, alpha)) - 1.0 / value
            for row, value in zip(normalized, alpha, strict=True)
        ]
        hessian = [row[:] for row in normalized]
        for k in indices:
            hessian[k][k] += 1.0 / (alpha[k] * alpha[k])
        step = solve_psd_block(hessian, indices, gradient, 0.0)
        if step is None:
            raise _no_solution(iterations, "the Newton system is singular")
        decrement_squared = sum(map(float.__mul__, gradient, step))
        if not math.isfinite(decrement_squared):
            raise _no_solution(iterations, "the Newton step is not finite")
        if decrement_squared < _DECREMENT_TOLERANCE:
            converged = True
            break
        alpha = _line_search_small(normalized, alpha, step, decrement_squared)
        if not all(map(math.isfinite, alpha)) or max(alpha) > _LARGEST_WEIGHT:
            raise _no_solution(iterations, "the weights grow without bound")
    if not converged:
        norm = math.sqrt(sum([value * value for value in alpha]))
        if _quadratic(normalized, [value / norm for value in alpha]) <= _STATIONARY_TOLERANCE:
            raise _no_solution(iterations, "the weights grow along a zero combination")
    weights = np.zeros(num_tasks)
    weights[active] = np.array(alpha) / math.sqrt(frobenius)
    return NashSolution(weights, converged, iterations)


def _quadratic(G: list[list[float]], x: list[float]) -> float:
    """``x^T G x`` on Python floats."""
    return sum([value * sum(map(float.__mul__, row, x)) for row, value in zip(G, x, strict=True)])


def _line_search_small(
    G: list[list[float]], alpha: list[float], step: list[float], decrement_squared: float
) -> list[float]:
    """:func:`_line_search` on Python floats."""
    if decrement_squared < 0.0625:
        return [a - s for a, s in zip(alpha, step, strict=True)]

    def objective(point: list[float]) -> float:
        return 0.5 * _quadratic(G, point) - sum(map(math.log, point))

    current = objective(alpha)
    t = 1.0
    for _ in range(30):
        candidate = [a - t * s for a, s in zip(alpha, step, strict=True)]
        if min(candidate) > 0 and objective(candidate) <= current - 0.25 * t * decrement_squared:
            return candidate
        t *= 0.5
    damping = 1.0 + math.sqrt(decrement_squared)
    return [a - s / damping for a, s in zip(alpha, step, strict=True)]


def _no_solution(iterations: int, symptom: str) -> NashMTLNoSolutionError:
    return NashMTLNoSolutionError(
        "Nash-MTL found no positive solution of G a = 1 / a "
        f"({symptom} after {iterations} Newton steps): the task gradients are (close to) "
        "Pareto-stationary, some nonnegative combination of them is zero (e.g. two exactly "
        "opposite gradients), so no update improves every task. Skip this step, keep the "
        "previous weights (the NashMTL method does when it has them), or use a method defined "
        "there (MGDA gives a zero update)"
    )


def _best_multiple(G: np.ndarray, point: np.ndarray) -> np.ndarray:
    """``t point`` for the ``t > 0`` that minimizes the objective along the ray (``point`` when
    ``point^T G point = 0``)."""
    curvature = float(point @ G @ point)
    return point * math.sqrt(point.size / curvature) if curvature > 0 else point


def _objective(G: np.ndarray, point: np.ndarray) -> float:
    """The bargaining objective ``a^T G a / 2 - sum_i log a_i``."""
    return 0.5 * float(point @ G @ point) - float(np.log(point).sum())


def _line_search(
    G: np.ndarray, alpha: np.ndarray, step: np.ndarray, decrement_squared: float
) -> np.ndarray:
    """The Newton step ``alpha - t step``. Near the solution (Newton decrement below 1/4) the
    full step, which self-concordance keeps feasible and converging quadratically; farther,
    ``t`` halves from 1 until the point is feasible and lowers the objective by Armijo's rule,
    and after 30 halvings the damped step ``t = 1 / (1 + decrement)``."""

    if decrement_squared < 0.0625:  # decrement < 1/4: the full step is feasible, quadratic
        return alpha - step
    current = _objective(G, alpha)
    t = 1.0
    for _ in range(30):
        candidate = alpha - t * step
        enough = current - 0.25 * t * decrement_squared
        if (candidate > 0).all() and _objective(G, candidate) <= enough:
            return candidate
        t *= 0.5
    return alpha - step / (1.0 + math.sqrt(decrement_squared))


def clip_weights(G: np.ndarray, weights: np.ndarray, max_norm: float) -> np.ndarray:
    """``weights`` scaled so that ``||J^T weights|| <= max_norm`` (unchanged for 0)."""
    if max_norm > 0:
        norm = math.sqrt(max(float(weights @ G @ weights), 0.0))
        if norm > max_norm:
            return weights * (max_norm / norm)
    return weights
