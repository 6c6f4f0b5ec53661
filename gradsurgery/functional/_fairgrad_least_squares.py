"""FairGrad's weights where ``G w = w^(-1/alpha)`` has no positive root: bounded least squares.

The authors' code never solves the equation directly: it hands the residual
``r(w) = G w - w^(-1/alpha)`` to ``scipy.optimize.least_squares(..., bounds=(0, inf))`` from
``w = 1/T`` and uses whatever point it returns. Where a root exists that point is the root.
Where the gradients are Pareto-stationary (a nonnegative combination of them is zero) the
infimum of ``||r||^2`` is 0 but is not attained: along the stationary combination the
weights grow without bound while the residual shrinks, and the answer is where the solver's
stopping rule halts. This module gives that answer without SciPy: Levenberg-Marquardt steps on
``w`` that stay inside ``w > 0``, from the authors' start, stopped by SciPy's default
tolerances.
"""

from __future__ import annotations

import numpy as np

__all__ = ["least_squares_weights"]

# scipy.optimize.least_squares's defaults: its tolerances, and 100 T evaluations at most.
_GTOL = 1e-8
_FTOL = 1e-8
_XTOL = 1e-8
_EVALUATIONS_PER_TASK = 100
# Fraction of the way to the bound w = 0 a step may go: the weights stay positive.
_TO_BOUNDARY = 0.99


def least_squares_weights(gram: list[list[float]], alpha: float) -> list[float]:
    """The bounded least-squares weights of ``G w = w^(-1/alpha)`` for a Gramian of order one.

    Parameters
    ----------
    gram : list[list[float]]
        ``T x T`` Gramian with a positive diagonal, its largest diagonal entry 1 (the caller
        normalizes it: the problem's solutions scale exactly, see
        :func:`~gradsurgery.functional.fairgrad_weights`).
    alpha : float
        Fairness parameter, ``> 0``.

    Returns
    -------
    list[float]
        Positive weights: where the descent on ``||G w - w^(-1/alpha)||^2`` stops by SciPy's
        tests (gradient, relative decrease or relative step below ``1e-8``), or after
        ``100 T`` steps; close to the root when one exists.
    """
    A = np.array(gram, dtype=np.float64)
    n = A.shape[0]
    p = 1.0 / alpha
    w = np.full(n, 1.0 / n)  # the authors' x_start
    residual = A @ w - w**-p
    cost = 0.5 * float(residual @ residual)
    damping, growth = -1.0, 2.0
    for _ in range(_EVALUATIONS_PER_TASK * n):
        if cost == 0.0:
            break
        barrier_slope = p * w ** (-p - 1.0)
        jacobian = A + np.diag(barrier_slope)
        # SciPy's gradient test, on the barrier's part of the gradient. Along a stationary
        # combination the Gramian's part, G r, measures how far the step left the weights out
        # of balance (the next step restores it): tested too, it would hold the solver back
        # until the weights are many orders of magnitude past where SciPy stops.
        if float(np.abs(barrier_slope * residual).max()) <= _GTOL:
            break
        if damping < 0:  # Marquardt's start: a small fraction of the curvature
            damping = 1e-3 * float((jacobian * jacobian).sum(axis=0).max())
        # The damped Gauss-Newton step as a least-squares problem, not through the normal
        # equations: near a Pareto-stationary point J is nearly singular, and J^T J would square
        # its condition number past float64's reach.
        augmented = np.vstack([jacobian, np.sqrt(damping) * np.eye(n)])
        step = np.linalg.lstsq(augmented, -np.concatenate([residual, np.zeros(n)]), rcond=None)[0]
        shrinking = step < 0
        if shrinking.any():
            step *= min(1.0, _TO_BOUNDARY * float((w[shrinking] / -step[shrinking]).min()))
        candidate = w + step
        candidate_residual = A @ candidate - candidate**-p
        candidate_cost = 0.5 * float(candidate_residual @ candidate_residual)
        jacobian_step = jacobian @ step
        predicted = -float(residual @ jacobian_step) - 0.5 * float(jacobian_step @ jacobian_step)
        ratio = (cost - candidate_cost) / predicted if predicted > 0 else -1.0
        if not (np.isfinite(candidate_cost) and ratio > 0):  # rejected: damp more (Nielsen)
            damping *= growth
            growth *= 2.0
            if not np.isfinite(damping):
                break
            continue
        decrease, previous = cost - candidate_cost, cost
        w, residual, cost = candidate, candidate_residual, candidate_cost
        damping *= max(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3)
        growth = 2.0
        if decrease < _FTOL * previous and ratio > 0.25:
            break
        if float(np.linalg.norm(step)) < _XTOL * (_XTOL + float(np.linalg.norm(w))):
            break
    return w.tolist()
