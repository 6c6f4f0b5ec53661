"""CAGrad: the best worst-task improvement in a ball around the mean gradient."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

from .._linalg import (
    _PYTHON_MAX_SIZE,
    SolverError,
    as_gramian,
    check_number,
    ldl_factor,
    ldl_solve,
    min_norm_simplex,
    min_norm_simplex_small,
    project_dual_cone,
    project_dual_cone_small,
    scale_of,
)

__all__ = ["cagrad_weights"]

CAGRAD_RESCALES = (0, 1, 2)
_MAX_ITER = 200
# ||g_w|| at or below this, with the largest task gradient of norm 1, counts as zero.
_VANISHING_NORM = 1e-8
# A KKT product short of the level by more than this (times the shifted Gramian's largest
# entry) is no rounding: about a hundred times the rounding of a product of T <= 100 terms.
_ROUNDING = 1e-13
_EPS = float(np.finfo(np.float64).eps)


def cagrad_weights(gramian: Tensor, c: float = 0.4, *, rescale: int = 1) -> Tensor:
    """CAGrad's task weights (Liu et al. 2021, *Conflict-Averse Gradient Descent for
    Multi-task Learning*).

    The update maximizes the worst task's improvement ``min_i g_i . d`` over the ball
    ``||d - g_0|| <= c ||g_0||`` around the mean gradient ``g_0``. Its dual is
    ``w = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||`` (``g_w = J^T w``), and
    ``d = g_0 + (c ||g_0|| / ||g_w||) g_w``. gradsurgery solves the dual exactly: for a fixed
    ``s > 0``, ``argmin_w g_w . g_0 + ||g_w||^2 / (2 s)`` is the minimum-norm point of the
    shifted hull ``{g_i + s g_0}`` (an MGDA problem), and the right ``s`` is the root of the
    monotone ``||g_{w(s)}|| = c ||g_0|| s``, found by safeguarded regula falsi.

    The update is ``d = u(s) / s`` for ``u(s)`` the minimum-norm point of that hull. Where the
    root is at ``s -> 0`` (0 in the hull of the gradients and ``g_w = 0`` solving the dual),
    the worst-task value is 0, reached by every point of the ball with ``J d >= 0``, and
    ``u(s) / s`` tends to the closest of them to ``g_0``: the projection of ``g_0`` onto the
    dual cone ``{d : J d >= 0}`` (DualProj's update), which is what is returned there.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.
    c : float
        Radius of the ball relative to ``||g_0||``, ``c >= 0`` (0.4 in the authors' NYUv2
        runs). ``c = 0`` gives the mean.
    rescale : {0, 1, 2}
        The official code's final scaling of ``d``: ``0`` none (torchjd's convention),
        ``1`` divided by ``1 + c^2`` (the official default), ``2`` divided by ``1 + c``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights ``1 / T + (c ||g_0|| / ||g_w||) w``, rescaled; the mean
        weights (rescaled) when ``g_0 = 0``; when ``g_w`` vanishes (below ``1e-8`` times the
        largest gradient norm), the weights of the projection of ``g_0`` onto the dual cone
        (rescaled). The official code divides by ``||g_w|| + 1e-8`` there instead, which
        leaves ``g_0`` only where its solver returns ``g_w`` exactly 0; ``g_0`` can conflict
        with a task that another point of the ball leaves unharmed.

    Raises
    ------
    RuntimeError
        If the root finding does not converge in 200 iterations (not seen in tests).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import cagrad_weights
    >>> G = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
    >>> cagrad_weights(G, c=0.0)
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> cagrad_weights(G, c=0.4, rescale=0)
    tensor([0.9000, 0.5000], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    c = check_number(c, "c")
    if rescale not in CAGRAD_RESCALES:
        raise ValueError(f"rescale must be one of {CAGRAD_RESCALES}, got {rescale!r}")
    return torch.from_numpy(np.array(solve_cagrad(G, c, rescale)))


def solve_cagrad(G: np.ndarray, c: float, rescale: int) -> list[float]:
    """:func:`cagrad_weights` of a checked Gramian and hyper-parameters."""
    num_tasks = G.shape[0]
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    if num_tasks <= _PYTHON_MAX_SIZE:
        weights = _small_weights(G.tolist(), c)
        if weights is not None:
            return [weight / divisor for weight in weights]
    mean = np.full(num_tasks, 1.0 / num_tasks)
    scale = scale_of(G)
    weights = mean
    if c > 0 and scale > 0:
        G = G / scale  # the weights do not change when G is scaled
        weights = mean + _ball_step(G, mean, c)
    return (weights / divisor).tolist()


def _small_weights(G: list[list[float]], c: float) -> list[float] | None:
    """:func:`solve_cagrad`'s weights before rescaling, on Python floats; ``None`` where the
    support guesses do not settle (the NumPy path then brackets the root)."""
    num_tasks = len(G)
    mean = [1.0 / num_tasks] * num_tasks
    scale = max([G[i][i] for i in range(num_tasks)])
    if not (c > 0 and scale > 0):
        return mean
    G = [[value / scale for value in row] for row in G]
    mean_gram = [sum(row) / num_tasks for row in G]  # g_i . g_0
    g0_squared = sum(mean_gram) / num_tasks
    if g0_squared <= 1e-30:
        return mean
    hull = _SmallShiftedHull(G, mean_gram, g0_squared, c * math.sqrt(g0_squared))
    solution = hull.solve_by_supports()
    if solution is None:
        return None
    w, norm = solution
    if norm <= _VANISHING_NORM:  # as in _ball_step
        return project_dual_cone_small(G, [mean])[0]
    step = hull.radius / norm
    return [m + step * w_i for m, w_i in zip(mean, w, strict=True)]


def _ball_step(G: np.ndarray, mean: np.ndarray, c: float) -> np.ndarray:
    """``(c ||g_0|| / ||g_w||) w`` for CAGrad's dual solution ``w``; where ``g_w`` vanishes,
    the step from the mean to the projection of ``g_0`` onto the dual cone; zero where
    ``g_0 = 0``."""
    mean_gram = G @ mean  # g_i . g_0
    g0_squared = float(mean @ mean_gram)
    if g0_squared <= 1e-30:
        return np.zeros_like(mean)
    problem = _ShiftedHull(G, mean_gram, g0_squared, c * math.sqrt(g0_squared))
    solution = problem.solve_by_supports()
    if solution is None:
        solution = problem.solve_by_bracketing()
    w, norm = solution
    # A vanishing g_w (0 in the hull, the root at s -> 0): the limit of d = u(s) / s, the
    # closest point to g_0 of {d : J d >= 0}, which the ball then holds (worst-task value 0).
    if norm <= _VANISHING_NORM:
        return project_dual_cone(G, mean) - mean
    return (problem.radius / norm) * w


class _ShiftedHull:
    """The minimum-norm points ``w(s)`` of ``{g_i + s g_0}`` and the fixed point
    ``||g_{w(s)}|| = radius * s`` that solves CAGrad's dual."""

    def __init__(self, G: np.ndarray, mean_gram: np.ndarray, g0_squared: float, radius: float):
        self.G, self.mean_gram, self.g0_squared, self.radius = G, mean_gram, g0_squared, radius
        self.rows = G.tolist()
        ones = np.ones_like(mean_gram)
        self.cross = np.outer(mean_gram, ones) + np.outer(ones, mean_gram)

    def shifted(self, s: float) -> np.ndarray:
        """Gramian of ``g_i + s g_0``: ``G + s (G b 1^T + 1 b^T G) + s^2 ||g_0||^2 1 1^T``."""
        return self.G + s * self.cross + s * s * self.g0_squared

    def norm(self, w: np.ndarray) -> float:
        return math.sqrt(max(float(w @ self.G @ w), 0.0))

    def solve_by_supports(self) -> tuple[np.ndarray, float] | None:
        """Exact solution by guessing the support of ``w``: on a fixed support, ``w(s)`` is
        affine in ``s`` (``p + s q``, from the equality-constrained KKT system), so the fixed
        point is a root of a quadratic. The guess is the support of ``w(s)`` at the current
        ``s``; it is kept when the KKT conditions hold at the root. ``None`` when no guess
        checks out within a few rounds (the caller then brackets the root)."""
        num_tasks = self.G.shape[0]
        s = 1.0 / self.radius  # ||g_w|| <= 1 at unit scale: the root is at or below this s
        for _ in range(num_tasks + 2):
            support = np.flatnonzero(min_norm_simplex(self.shifted(s)) > 0)
            affine = self._affine_on(support)
            if affine is None:
                return None
            p, q = affine
            root = self._fixed_point(p, q)
            if root is None:
                return None
            w = p + root * q
            if self._is_optimal(w, root):
                w = self._join_near_active(w, root, support)
                return np.maximum(w, 0.0), self.norm(w)
            s = root
        return None

    def _join_near_active(self, w: np.ndarray, s: float, support: np.ndarray) -> np.ndarray:
        """Let the task off the support whose KKT product falls shortest of the level, by less
        than the optimality test's tolerance but more than rounding, join the support (in
        place of one member, if it must), while that gives an optimal point whose worst
        task's value is not lower; repeated for the next one.

        The update is ``g_0 + g_w / s``: when the root ``s`` is small (task gradients whose
        norms lie decades apart), a shortfall the dual test tolerates leaves that task's
        value below the others' by ``1 / s`` times as much. A vanishing ``g_w`` has no such
        update (the caller projects ``g_0`` instead): ``w`` is returned as it is."""
        if self.norm(w) <= _VANISHING_NORM:
            return w
        for _ in range(w.size):
            shifted = self.shifted(s)
            products = shifted @ w
            shortfall = products - float(w @ products)
            shortfall[support] = 0.0
            task = int(np.argmin(shortfall))
            if not shortfall[task] < -_ROUNDING * max(1.0, float(np.abs(shifted).max())):
                break
            joined = self._exchange(np.union1d(support, [task]), task)
            if joined is None or not self._worst_value(joined[0]) >= self._worst_value(w):
                break
            w, s, support = joined
        return w

    def _exchange(
        self, support: np.ndarray, task: int
    ) -> tuple[np.ndarray, float, np.ndarray] | None:
        """The best optimal point on ``support`` (which holds ``task``) or on ``support``
        less one other member (the task may push one out of the face); ``None`` if none is
        optimal."""
        best = None
        for face in [support] + [support[support != j] for j in support if j != task]:
            affine = self._affine_on(face)
            root = None if affine is None else self._fixed_point(*affine)
            if root is None:
                continue
            w = affine[0] + root * affine[1]
            if (
                self._is_optimal(w, root)
                and self.norm(w) > _VANISHING_NORM
                and (best is None or self._worst_value(w) > self._worst_value(best[0]))
            ):
                best = (w, root, face)
        return best

    def _worst_value(self, w: np.ndarray) -> float:
        """``min_i g_i . d`` for the update ``d = g_0 + radius g_w / ||g_w||`` (unit scale;
        ``g_w`` not vanishing)."""
        norm = self.norm(w)
        return float((self.mean_gram + (self.radius / norm) * (self.G @ w)).min())

    def _affine_on(self, support: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``p, q`` with ``w(s) = p + s q`` the minimizer on the face ``support``."""
        if support.size <= _PYTHON_MAX_SIZE:
            affine = self._affine_by_elimination(support)
            if affine is not None:
                return affine
        size = support.size
        kkt = np.zeros((size + 1, size + 1))
        kkt[:size, :size] = self.G[np.ix_(support, support)]
        kkt[:size, size] = kkt[size, :size] = 1.0
        rhs = np.zeros((size + 1, 2))
        rhs[size, 0] = 1.0  # p: sum of weights is 1
        rhs[:size, 1] = -self.mean_gram[support]  # q: the shift's linear term
        solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
        if not np.isfinite(solution).all():
            return None
        p, q = np.zeros(self.G.shape[0]), np.zeros(self.G.shape[0])
        p[support], q[support] = solution[:size, 0], solution[:size, 1]
        return p, q

    def _affine_by_elimination(self, support: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_affine_on` through ``G_S``'s ``L D L^T`` factorization when ``G_S`` is
        nonsingular: with ``a = G_S^-1 1`` and ``b = -G_S^-1 (G b_0)_S``, ``p = a / 1^T a``
        and ``q = b - (1^T b / 1^T a) a`` (the multiplier of ``1^T w = 1`` eliminated).
        ``None`` when ``G_S`` is singular (least squares then)."""
        indices = support.tolist()
        singular = 1e3 * len(indices) * _EPS * max(1.0, float(np.abs(self.G).max()))
        factors = ldl_factor(self.rows, indices, singular)
        if factors is None:
            return None
        a = np.array(ldl_solve(*factors, [1.0] * len(indices)))
        b = np.array(ldl_solve(*factors, [-self.mean_gram[i] for i in indices]))
        total = float(a.sum())
        if not total > 0:  # pragma: no cover - 1^T G_S^-1 1 > 0 for a positive definite G_S
            return None
        p, q = np.zeros(self.G.shape[0]), np.zeros(self.G.shape[0])
        p[support] = a / total
        q[support] = b - (float(b.sum()) / total) * a
        return p, q

    def _fixed_point(self, p: np.ndarray, q: np.ndarray) -> float | None:
        """The positive root of ``||J^T (p + s q)||^2 = radius^2 s^2``, if exactly one."""
        Gp, Gq = self.G @ p, self.G @ q
        a = float(q @ Gq) - self.radius**2
        b = 2.0 * float(p @ Gq)
        c = float(p @ Gp)
        return _single_positive_root(a, b, c)

    def _is_optimal(self, w: np.ndarray, s: float) -> bool:
        """KKT of the minimum-norm problem on ``{g_i + s g_0}`` at ``w``, to rounding."""
        shifted = self.shifted(s)
        tolerance = 1e-10 * max(1.0, float(np.abs(shifted).max()))
        if (w < -tolerance).any():
            return False
        products = shifted @ w
        return bool((products >= float(w @ products) - tolerance).all())

    def solve_by_bracketing(self) -> tuple[np.ndarray, float]:
        """The fixed point by regula falsi on ``log s``: slower, but always converges, since
        ``||g_{w(s)}|| / s`` is nonincreasing (the dual is jointly convex in ``w`` and
        ``||g_w||``)."""

        def excess(s: float) -> tuple[float, np.ndarray, float]:
            w = min_norm_simplex(self.shifted(s))
            norm = self.norm(w)
            return (math.log(norm / (self.radius * s)) if norm > 0 else -math.inf), w, norm

        high = 1.0 / self.radius
        f_high, w, norm = excess(high)
        if f_high == 0.0:
            return w, norm
        low, f_low = high, f_high
        for _ in range(60):  # bracket the root from below
            low /= 10.0
            f_low, w, norm = excess(low)
            if f_low >= 0:
                break
            if norm <= _VANISHING_NORM:
                # ||g_{w(s)}|| is nondecreasing in s, so it vanishes at the root below too; and
                # further down it is rounding noise, whose ratio to s can fake a bracket.
                return np.zeros_like(w), 0.0
        else:  # ||g_w(s)|| / s -> 0 as s -> 0: the hull holds 0 and g_w = 0 is optimal
            return np.zeros_like(w), 0.0
        if f_low == 0.0:
            return w, norm
        # Illinois regula falsi: superlinear, and the bracket always holds the root.
        x_low, x_high = math.log(low), math.log(high)
        side = 0
        for _ in range(_MAX_ITER):
            if math.isinf(f_high):
                x = 0.5 * (x_low + x_high)
            else:
                x = x_high - f_high * (x_high - x_low) / (f_high - f_low)
            f, w, norm = excess(math.exp(x))
            if f == 0.0 or x_high - x_low < 1e-13 or abs(f) < 1e-14:
                return w, norm
            if f > 0:
                x_low, f_low = x, f
                if side == -1:
                    f_high /= 2.0
                side = -1
            else:
                x_high, f_high = x, f
                if side == 1:
                    f_low /= 2.0
                side = 1
        raise SolverError(f"CAGrad's dual did not converge in {_MAX_ITER} iterations")


class _SmallShiftedHull:
    """:meth:`_ShiftedHull.solve_by_supports` on Python floats, for at most
    ``_PYTHON_MAX_SIZE`` tasks: the same support guesses, affine minimizers, roots and
    optimality test, without NumPy's per-call cost. ``None`` wherever the NumPy version could
    take another way (a singular face, no single root, no support within the rounds): the
    caller then runs that version, which brackets the root if it must."""

    def __init__(
        self, G: list[list[float]], mean_gram: list[float], g0_squared: float, radius: float
    ):
        self.G, self.mean_gram, self.g0_squared, self.radius = G, mean_gram, g0_squared, radius
        self.singular = 1e3 * len(self.G) * _EPS * max(1.0, _largest_magnitude(self.G))

    def shifted(self, s: float) -> list[list[float]]:
        m, constant = self.mean_gram, s * s * self.g0_squared
        return [
            [value + s * (m_i + m_j) + constant for value, m_j in zip(row, m, strict=True)]
            for row, m_i in zip(self.G, m, strict=True)
        ]

    def solve_by_supports(self) -> tuple[list[float], float] | None:
        num_tasks = len(self.G)
        s = 1.0 / self.radius
        for _ in range(num_tasks + 2):
            w = min_norm_simplex_small(self.shifted(s))
            support = [i for i in range(num_tasks) if w[i] > 0]
            affine = self._affine_on(support)
            if affine is None:
                return None
            p, q = affine
            root = self._fixed_point(p, q)
            if root is None:
                return None
            w = [p_i + root * q_i for p_i, q_i in zip(p, q, strict=True)]
            if self._is_optimal(w, root):
                w = self._join_near_active(w, root, support)
                norm = math.sqrt(max(_quadratic(self.G, w, w), 0.0))
                return [max(w_i, 0.0) for w_i in w], norm
            s = root
        return None

    def _join_near_active(self, w: list[float], s: float, support: list[int]) -> list[float]:
        """As :meth:`_ShiftedHull._join_near_active`."""
        if _quadratic(self.G, w, w) <= _VANISHING_NORM**2:
            return w
        for _ in range(len(w)):
            shifted = self.shifted(s)
            products = [sum(map(operator.mul, row, w)) for row in shifted]
            level = sum(map(operator.mul, w, products))
            outside = [i for i in range(len(w)) if i not in support]
            if not outside:
                break
            task = min(outside, key=products.__getitem__)
            if not products[task] - level < -_ROUNDING * max(1.0, _largest_magnitude(shifted)):
                break
            joined = self._exchange(sorted([*support, task]), task)
            if joined is None or not self._worst_value(joined[0]) >= self._worst_value(w):
                break
            w, s, support = joined
        return w

    def _exchange(
        self, support: list[int], task: int
    ) -> tuple[list[float], float, list[int]] | None:
        """As :meth:`_ShiftedHull._exchange`."""
        best = None
        for face in [support] + [[i for i in support if i != j] for j in support if j != task]:
            affine = self._affine_on(face)
            root = None if affine is None else self._fixed_point(*affine)
            if root is None:
                continue
            w = [p_i + root * q_i for p_i, q_i in zip(*affine, strict=True)]
            if (
                self._is_optimal(w, root)
                and _quadratic(self.G, w, w) > _VANISHING_NORM**2
                and (best is None or self._worst_value(w) > self._worst_value(best[0]))
            ):
                best = (w, root, face)
        return best

    def _worst_value(self, w: list[float]) -> float:
        """As :meth:`_ShiftedHull._worst_value`."""
        step = self.radius / math.sqrt(max(_quadratic(self.G, w, w), 0.0))
        return min(
            m + step * sum(map(operator.mul, row, w))
            for m, row in zip(self.mean_gram, self.G, strict=True)
        )

    def _affine_on(self, support: list[int]) -> tuple[list[float], list[float]] | None:
        """As :meth:`_ShiftedHull._affine_by_elimination`."""
        factors = ldl_factor(self.G, support, self.singular)
        if factors is None:
            return None
        a = ldl_solve(*factors, [1.0] * len(support))
        b = ldl_solve(*factors, [-self.mean_gram[i] for i in support])
        total = sum(a)
        if not total > 0:  # pragma: no cover - as in _affine_by_elimination
            return None
        shift = sum(b) / total
        p, q = [0.0] * len(self.G), [0.0] * len(self.G)
        for i, a_i, b_i in zip(support, a, b, strict=True):
            p[i], q[i] = a_i / total, b_i - shift * a_i
        return p, q

    def _fixed_point(self, p: list[float], q: list[float]) -> float | None:
        """As :meth:`_ShiftedHull._fixed_point`."""
        a = _quadratic(self.G, q, q) - self.radius**2
        b = 2.0 * _quadratic(self.G, p, q)
        c = _quadratic(self.G, p, p)
        return _single_positive_root(a, b, c)

    def _is_optimal(self, w: list[float], s: float) -> bool:
        """As :meth:`_ShiftedHull._is_optimal`."""
        shifted = self.shifted(s)
        tolerance = 1e-10 * max(1.0, _largest_magnitude(shifted))
        if min(w) < -tolerance:
            return False
        products = [sum(map(operator.mul, row, w)) for row in shifted]
        level = sum(map(operator.mul, w, products)) - tolerance
        return all(product >= level for product in products)


def _quadratic(G: list[list[float]], x: list[float], y: list[float]) -> float:
    """``x^T G y`` on Python floats."""
    return sum([x_i * sum(map(operator.mul, row, y)) for row, x_i in zip(G, x, strict=True)])


def _largest_magnitude(G: list[list[float]]) -> float:
    return max([max(map(abs, row)) for row in G])


def _single_positive_root(a: float, b: float, c: float) -> float | None:
    """The positive root of ``a s^2 + b s + c = 0``, if there is exactly one."""
    if abs(a) < 1e-14:
        return -c / b if b < 0 else None
    discriminant = b * b - 4.0 * a * c
    if discriminant < 0:
        return None
    roots = [(-b + sign * math.sqrt(discriminant)) / (2.0 * a) for sign in (1.0, -1.0)]
    positive = [root for root in roots if root > 0]
    return positive[0] if len(positive) == 1 else None
