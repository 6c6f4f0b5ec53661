"""Small dense linear algebra on ``[T, T]`` Gramians, in float64 NumPy.

The problems here have one variable per task, so ``T`` is a few to a few tens: the solvers are
exact active-set methods with a bounded number of iterations, written for that size, with no
solver library behind them. The functions take and return NumPy float64 arrays, except the
``*_small`` ones and the block solves, which work on Python floats (lists): up to
``_PYTHON_MAX_SIZE`` tasks a NumPy call costs more than the arithmetic it does, so the array
functions hand such problems to them. The public functions in :mod:`gradsurgery.functional`
convert from and to tensors.

Two quadratic programs cover MGDA, UPGrad, DualProj and CAGrad's sub-problem, and both reduce to
a non-negative least-squares problem in Gram form (:func:`nnls_gram`, and
:func:`nnls_gram_rows` for many targets with one matrix):

- the minimum-norm point of the convex hull of the task gradients (:func:`min_norm_simplex`);
- the projection of ``J^T u`` onto the dual cone of the rows of ``J`` (:func:`project_dual_cone`).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

from ._validation import check_real

__all__ = [
    "SolverError",
    "as_gramian",
    "as_task_vector",
    "check_number",
    "check_positive_int",
    "eigh",
    "ldl_factor",
    "ldl_solve",
    "min_norm_simplex",
    "min_norm_simplex_small",
    "nnls_gram",
    "nnls_gram_rows",
    "nnls_gram_small",
    "normalize_and_regularize",
    "pinv_psd",
    "preference_weights",
    "project_dual_cone",
    "project_dual_cone_small",
    "scale_of",
    "solve_psd_block",
]

_EPS = float(np.finfo(np.float64).eps)


class SolverError(RuntimeError):
    """A small solver did not reach its optimality conditions within its iteration bound."""


def as_gramian(gramian: Tensor | np.ndarray, name: str = "gramian") -> np.ndarray:
    """``gramian`` as a float64 ``[T, T]`` array, after checking it is one.

    Raises ``ValueError`` when it is not square, is empty, holds NaN or Inf, or has a negative
    diagonal entry (a squared norm), and ``TypeError`` when it is not a float tensor or array.
    """
    if isinstance(gramian, Tensor):
        if not gramian.is_floating_point():
            raise TypeError(f"{name} must have a float dtype, got {gramian.dtype}")
        shape = tuple(gramian.shape)
        if len(shape) == 2 and shape[0] == shape[1] and 1 <= shape[0] <= _PYTHON_MAX_SIZE:
            # A few Python floats check faster than NumPy's calls on a 3 x 3 array.
            rows = gramian.detach().tolist()
            if not all(math.isfinite(value) for row in rows for value in row):
                raise ValueError(f"{name} holds NaN or Inf; the task gradients must be finite")
            if any(rows[i][i] < 0 for i in range(shape[0])):
                raise ValueError(_NEGATIVE_DIAGONAL.format(name=name))
            return np.array(rows)
        array = gramian.detach().to(device="cpu").double().numpy()
    elif isinstance(gramian, np.ndarray):
        if not np.issubdtype(gramian.dtype, np.floating):
            raise TypeError(f"{name} must have a float dtype, got {gramian.dtype}")
        array = gramian.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a [T, T] tensor, got {type(gramian).__name__}")
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise ValueError(f"{name} must be a square [T, T] matrix with T >= 1, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf; the task gradients must be finite")
    if (array.diagonal() < 0).any():
        raise ValueError(_NEGATIVE_DIAGONAL.format(name=name))
    return array


_NEGATIVE_DIAGONAL = (
    "{name} has a negative diagonal entry; a Gramian G = J J^T has squared norms there"
)


def eigh(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix.

    Through ``torch.linalg.eigh``, which honours ``torch.set_num_threads``: NumPy's LAPACK
    runs on its own BLAS threads and took 20 times longer at ``T = 50`` on a loaded machine.
    Up to ``_PYTHON_MAX_SIZE`` through NumPy, whose call costs half of torch's there.
    """
    if gramian.shape[0] <= _PYTHON_MAX_SIZE:  # LAPACK runs no thread at this size
        return np.linalg.eigh(gramian)
    values, vectors = torch.linalg.eigh(torch.from_numpy(gramian))
    return values.numpy(), vectors.numpy()


def pinv_psd(gramian: np.ndarray, rtol: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix: eigenvalues at or below ``rtol`` times the
    largest are taken as zero (``torch.linalg.pinv``'s rule for ``rtol``)."""
    values, vectors = eigh(gramian)
    kept = values > rtol * max(float(values.max()), 0.0)
    return (vectors[:, kept] / values[kept]) @ vectors[:, kept].T


def scale_of(gramian: np.ndarray) -> float:
    """The largest squared norm (diagonal entry) of ``gramian``; 0 when all gradients are 0."""
    return float(gramian.diagonal().max())


def nnls_gram(
    matrix: np.ndarray,
    target: np.ndarray,
    *,
    max_iter: int | None = None,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Minimize ``z^T M z - 2 c^T z`` over ``z >= 0``, for a symmetric PSD ``M`` (Gram form NNLS).

    With ``M = A^T A`` and ``c = A^T b`` this is non-negative least squares
    ``min ||A z - b||`` without ``A``. The algorithm is Lawson and Hanson's active-set method
    (*Solving Least Squares Problems*, 1974, ch. 23): exact, finite, and it keeps the columns of
    the passive set linearly independent, so a rank-deficient ``M`` is fine. The scale of
    ``M`` and ``c`` should be about 1 (the callers normalize): the optimality tolerance is
    absolute.

    Parameters
    ----------
    matrix : numpy.ndarray
        ``[n, n]`` symmetric positive semi-definite ``M``.
    target : numpy.ndarray
        ``[n]`` vector ``c``.
    max_iter : int, optional
        Bound on the number of columns entering the passive set; ``3 n`` by default. Given
        explicitly, Lawson and Hanson's method runs alone (up to ``_PYTHON_MAX_SIZE``
        variables it otherwise starts with the exchange method of :func:`nnls_gram_small`).
    initial : numpy.ndarray, optional
        ``[n]`` bool: a guess of the positive coordinates to start from instead of ``z = 0``
        (run on NumPy). The guess shrinks until its subproblem's solution is positive, a valid
        start for the method; any guess gives the same minimizer, a good one fewer steps.

    Returns
    -------
    numpy.ndarray
        The minimizer ``z`` (``[n]``, float64, ``z >= 0``).

    Raises
    ------
    SolverError
        When the optimality conditions are not met within ``max_iter`` entries. (A passive
        set that comes back, which rounding can cause in an ill-conditioned ``M``, ends the
        method with the best iterate instead: the objective then differs between them by
        rounding only.)
    """
    n = target.shape[0]
    if n <= _PYTHON_MAX_SIZE and initial is None and max_iter is None:
        return np.array(nnls_gram_small(matrix.tolist(), target.tolist()))
    max_iter = 3 * n if max_iter is None else max_iter
    magnitude = max(1.0, float(np.abs(matrix).max()), float(np.abs(target).max()))
    tolerance = 10.0 * n * _EPS * magnitude
    z = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    if initial is not None:  # drop the guess's non-positive coordinates until none is left
        passive = initial.copy()
        while passive.any():
            indices = np.flatnonzero(passive)
            solution = _solve_psd(matrix[np.ix_(indices, indices)], target[indices])
            if (solution > tolerance).all():
                z[indices] = solution
                break
            passive[indices[solution <= tolerance]] = False
    gradient = target - matrix @ z
    # In exact arithmetic every outer round lowers the objective, so no passive set comes
    # back. With rounding, in a Gramian ill-conditioned to ~1e11, columns whose gain is below
    # the objective's rounding can enter and leave in turn: when a passive set comes back,
    # the rounds since are equal to rounding, and the best of them is returned.
    seen: dict[bytes, tuple[float, np.ndarray]] = {}
    for _ in range(max_iter):
        candidates = np.where(passive, -np.inf, gradient)
        entering = int(np.argmax(candidates))
        if candidates[entering] <= tolerance:
            return z  # KKT: no free coordinate can lower the objective
        key = passive.tobytes()
        if key in seen:
            return min(seen.values(), key=lambda pair: pair[0])[1]
        # The objective z^T M z - 2 c^T z from the gradient c - M z already at hand.
        seen[key] = (-float(z @ (gradient + target)), z)
        passive[entering] = True
        for _ in range(n + 1):
            indices = np.flatnonzero(passive)
            trial = np.zeros(n)
            trial[indices] = _solve_psd(matrix[np.ix_(indices, indices)], target[indices])
            if (trial[indices] > 0).all():
                z = trial
                break
            if trial[entering] <= 0 and z[entering] == 0:
                # The entering column improves the objective by less than rounding: optimal.
                passive[entering] = False
                return z
            blocking = indices[trial[indices] <= 0]
            step = float(np.min(z[blocking] / (z[blocking] - trial[blocking])))
            z = z + step * (trial - z)
            passive &= z > tolerance
            z[~passive] = 0.0
        else:  # pragma: no cover - Lawson-Hanson's inner loop drops a column each pass
            raise SolverError("the active-set NNLS solver cycled")
        gradient = target - matrix @ z
    raise SolverError(
        f"the active-set NNLS solver did not converge in {max_iter} iterations; "
        "the Gramian is likely too ill-conditioned for float64"
    )


# Up to this many variables the NNLS runs on Python floats: for a 3 x 3 problem a NumPy call
# costs more than the arithmetic it does.
_PYTHON_MAX_SIZE = 6
# Exchange rounds before the exchange method gives way to Lawson-Hanson. Murty's single-index
# rule ends in finitely many rounds in exact arithmetic; rounding could make it cycle.
_EXCHANGE_ROUNDS = 10


def _tolerances(n: int, magnitude: float) -> tuple[float, float]:
    """The optimality tolerance of the NNLS solvers (absolute, for a unit-scale problem) and the
    pivot at or below which a passive block counts as singular."""
    magnitude = max(1.0, magnitude)
    return 10.0 * n * _EPS * magnitude, 1e3 * n * _EPS * magnitude


def nnls_gram_small(
    matrix: list[list[float]], target: list[float], matrix_magnitude: float | None = None
) -> list[float]:
    """:func:`nnls_gram` of a small problem on Python floats: the exchange method first, then
    Lawson-Hanson in NumPy when a passive block is singular (dependent columns).
    ``matrix_magnitude``: the largest ``|M_ij|``, when the caller knows it."""
    if matrix_magnitude is None:
        matrix_magnitude = max([max(map(abs, row)) for row in matrix])
    magnitude = max(matrix_magnitude, max(map(abs, target)))
    tolerance, singular = _tolerances(len(target), magnitude)
    solution = _nnls_gram_exchange(matrix, target, tolerance, singular)
    if solution is None:
        return nnls_gram(np.array(matrix), np.array(target), max_iter=3 * len(target)).tolist()
    return solution


def _nnls_gram_exchange(
    matrix: list[list[float]], target: list[float], tolerance: float, singular: float
) -> list[float] | None:
    """Gram-form NNLS by block principal pivoting (Júdice and Pires 1994; Kim and Park 2011,
    *Fast nonnegative matrix factorization: an active-set-like method and comparisons*).

    Where Lawson-Hanson adds one column per solve, this exchanges every coordinate that breaks
    the optimality conditions at once: the passive coordinates below zero leave, the active ones
    whose gradient points inward enter. Kim and Park's safeguard keeps it finite: after three
    rounds without fewer violations, only the last violating coordinate is exchanged (Murty's
    rule). At ``T = 3`` one or two solves instead of three. ``None`` when a passive block is
    singular (to ``singular``) or the rounds run out; the caller then runs Lawson-Hanson.
    """
    n = len(target)
    passive = [value > tolerance for value in target]  # from z = 0 every c_i > 0 enters
    if True not in passive:
        return [0.0] * n  # z = 0 is optimal
    everything = range(n)
    budget, fewest = 3, n + 1
    for _ in range(_EXCHANGE_ROUNDS + n):
        indices = [i for i in everything if passive[i]]
        z = [0.0] * n
        if indices:
            sub = solve_psd_block(matrix, indices, target, singular)
            if sub is None:
                return None
            for i, value in zip(indices, sub, strict=True):
                z[i] = value
        # Passive coordinates below zero, and active ones whose gradient M z - c is negative.
        violations = [
            i
            for i in everything
            if (
                z[i] < -tolerance
                if passive[i]
                else sum(map(operator.mul, matrix[i], z)) - target[i] < -tolerance
            )
        ]
        if not violations:
            return [value if value > 0.0 else 0.0 for value in z]
        if len(violations) < fewest:
            fewest, budget = len(violations), 3
        elif budget > 0:
            budget -= 1
        else:
            violations = violations[-1:]
        for i in violations:
            passive[i] = not passive[i]
    return None


def solve_psd_block(
    matrix: list[list[float]], indices: list[int], rhs: list[float], singular: float
) -> list[float] | None:
    """``M_PP^-1 b_P`` for the PSD block of ``matrix`` on ``indices`` (an LDL^T factorization);
    ``None`` when a pivot is at or below ``singular``."""
    size = len(indices)
    if size == 1:
        i = indices[0]
        pivot = matrix[i][i]
        return None if pivot <= singular else [rhs[i] / pivot]
    if size == 2:
        i, j = indices
        a, b, d = matrix[i][i], matrix[i][j], matrix[j][j]
        if a <= singular:
            return None
        schur = d - b * b / a
        if schur <= singular:
            return None
        determinant = a * schur
        return [(d * rhs[i] - b * rhs[j]) / determinant, (a * rhs[j] - b * rhs[i]) / determinant]
    if size == 3:  # ldl_factor and ldl_solve unrolled: the Newton systems of three tasks
        i, j, k = indices
        row_i, row_j, row_k = matrix[i], matrix[j], matrix[k]
        d0 = row_i[i]
        if d0 <= singular:
            return None
        l10, l20 = row_j[i] / d0, row_k[i] / d0
        d1 = row_j[j] - l10 * row_j[i]
        if d1 <= singular:
            return None
        l21 = (row_k[j] - l20 * row_j[i]) / d1
        d2 = row_k[k] - l20 * row_k[i] - l21 * l21 * d1
        if d2 <= singular:
            return None
        y0 = rhs[i]
        y1 = rhs[j] - l10 * y0
        y2 = rhs[k] - l20 * y0 - l21 * y1
        x2 = y2 / d2
        x1 = y1 / d1 - l21 * x2
        return [y0 / d0 - l10 * x1 - l20 * x2, x1, x2]
    factors = ldl_factor(matrix, indices, singular)
    if factors is None:
        return None
    return ldl_solve(*factors, [rhs[i] for i in indices])


def ldl_factor(
    matrix: list[list[float]], indices: list[int], singular: float
) -> tuple[list[list[float]], list[float]] | None:
    """``L`` (unit lower triangular) and the pivots ``D`` of ``M_PP = L D L^T``, for the PSD
    block of ``matrix`` on ``indices``; ``None`` when a pivot is at or below ``singular``."""
    size = len(indices)
    lower = [[0.0] * size for _ in range(size)]
    pivots = [0.0] * size
    for a in range(size):
        row, lower_a = matrix[indices[a]], lower[a]
        for b in range(a):
            lower_b = lower[b]
            value = row[indices[b]]
            for k in range(b):
                value -= lower_a[k] * lower_b[k] * pivots[k]
            lower_a[b] = value / pivots[b]
        pivot = row[indices[a]]
        for k in range(a):
            pivot -= lower_a[k] * lower_a[k] * pivots[k]
        if pivot <= singular:
            return None
        pivots[a] = pivot
    return lower, pivots


def ldl_solve(lower: list[list[float]], pivots: list[float], rhs: list[float]) -> list[float]:
    """``x`` with ``L D L^T x = rhs``, from :func:`ldl_factor`."""
    size = len(pivots)
    forward = [0.0] * size
    for a in range(size):
        value, lower_a = rhs[a], lower[a]
        for k in range(a):
            value -= lower_a[k] * forward[k]
        forward[a] = value
    solution = [0.0] * size
    for a in range(size - 1, -1, -1):
        value = forward[a] / pivots[a]
        for k in range(a + 1, size):
            value -= lower[k][a] * solution[k]
        solution[a] = value
    return solution


def nnls_gram_rows(matrix: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """:func:`nnls_gram` for every row of ``targets`` (``[K, n]``) with the same ``M``.

    The rows run the exchange method of :func:`_nnls_gram_exchange` in lockstep, every round
    one batched Cholesky solve of all the rows' passive blocks: a few rounds where
    Lawson-Hanson takes one per column of the largest support. When a block is singular or
    the rounds run out, Lawson and Hanson's method, also in lockstep.
    """
    magnitude = max(float(np.abs(matrix).max()), float(np.abs(targets).max()))
    tolerance, singular = _tolerances(targets.shape[1], magnitude)
    solution = _nnls_gram_rows_exchange(matrix, targets, tolerance, singular)
    if solution is not None:
        return solution
    return _nnls_gram_rows_lawson_hanson(matrix, targets, tolerance)


def _nnls_gram_rows_exchange(
    matrix: np.ndarray, targets: np.ndarray, tolerance: float, singular: float
) -> np.ndarray | None:
    """:func:`_nnls_gram_exchange` for every row of ``targets``, the rounds in lockstep."""
    rows, n = targets.shape
    z = np.zeros((rows, n))
    passive = targets > tolerance
    budget = np.full(rows, 3)
    fewest = np.full(rows, n + 1)
    unfinished = np.arange(rows)
    for _ in range(_EXCHANGE_ROUNDS + n):
        mask, rhs = passive[unfinished], targets[unfinished]
        trial = _cholesky_solve_rows(matrix, rhs, mask, singular)
        if trial is None:
            return None
        gradient = trial @ matrix - rhs
        violations = np.where(mask, trial < -tolerance, gradient < -tolerance)
        counts = violations.sum(axis=1)
        done = counts == 0
        z[unfinished[done]] = np.maximum(trial[done], 0.0)
        unfinished, violations, counts = unfinished[~done], violations[~done], counts[~done]
        if unfinished.size == 0:
            return z
        fewer = counts < fewest[unfinished]
        fewest[unfinished[fewer]] = counts[fewer]
        budget[unfinished[fewer]] = 3
        retry = ~fewer & (budget[unfinished] > 0)
        budget[unfinished[retry]] -= 1
        single = np.flatnonzero(~fewer & ~retry)
        if single.size:  # Murty's rule: only the last violating coordinate
            last = n - 1 - np.argmax(violations[single, ::-1], axis=1)
            violations[single] = False
            violations[single, last] = True
        passive[unfinished] ^= violations
    return None


def _cholesky_solve_rows(
    matrix: np.ndarray, targets: np.ndarray, passive: np.ndarray, singular: float
) -> np.ndarray | None:
    """Each row's ``M_PP x_P = c_P`` (``x = 0`` off ``P``) by one batched Cholesky
    factorization; ``None`` when a pivot is at or below ``singular``. Beyond
    ``_GATHER_MIN_SIZE`` variables each row's passive coordinates are gathered first, into
    blocks as large as the largest passive set (padded with the identity): at ``T = 50`` the
    sets hold about half the tasks, and the work goes with the cube of the block size (6.5 ->
    4.2 ms for UPGrad). Through torch, which honours ``torch.set_num_threads``."""
    n = matrix.shape[0]
    counts = passive.sum(axis=1)
    size = int(counts.max())
    every_row = np.arange(targets.shape[0])[:, None]
    order = None
    if n > _GATHER_MIN_SIZE and size < n:  # each row's passive indices first, in order
        order = np.argsort(~passive, axis=1, kind="stable")[:, :size]
        inside = np.arange(size) < counts[:, None]
        blocks = matrix[order[:, :, None], order[:, None, :]]
        rhs = targets[every_row, order]
    else:
        size, inside, blocks, rhs = n, passive, matrix[None], targets
    blocks = np.where(inside[:, :, None] & inside[:, None, :], blocks, 0.0)
    diagonal = np.arange(size)
    blocks[:, diagonal, diagonal] += ~inside  # the identity off each row's passive set
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(blocks))
    if bool(info.any()) or float(factor.diagonal(dim1=-2, dim2=-1).min()) ** 2 <= singular:
        return None
    rhs = torch.from_numpy(np.where(inside, rhs, 0.0)[:, :, None])
    compact = np.where(inside, torch.cholesky_solve(rhs, factor)[:, :, 0].numpy(), 0.0)
    if order is None:
        return compact
    solution = np.zeros_like(targets)
    solution[every_row, order] = compact
    return solution


# Above this many variables the batched solves gather each row's passive block first (the
# gathering costs more than it saves on small blocks: T = 10 took 20% longer).
_GATHER_MIN_SIZE = 16


def _nnls_gram_rows_lawson_hanson(
    matrix: np.ndarray, targets: np.ndarray, tolerance: float
) -> np.ndarray:
    """Lawson and Hanson's method for every row in lockstep: each round adds one column to
    every unfinished row's passive set and solves all the rows' subproblems in one batched
    ``numpy.linalg.solve``."""
    rows, n = targets.shape
    z = np.zeros((rows, n))
    passive = np.zeros((rows, n), dtype=bool)
    running = np.ones(rows, dtype=bool)
    everything = np.arange(rows)
    for _ in range(3 * n):
        gradient = targets - z @ matrix
        candidates = np.where(passive, -np.inf, gradient)
        entering = np.argmax(candidates, axis=1)
        running &= candidates[everything, entering] > tolerance
        if not running.any():
            return z
        passive[running, entering[running]] = True
        inner = running.copy()
        for _ in range(n + 1):
            index = np.flatnonzero(inner)
            trial = _solve_passive(matrix, targets[index], passive[index])
            mask = passive[index]
            positive = np.where(mask, trial > 0, True).all(axis=1)
            z[index[positive]] = trial[positive]
            inner[index[positive]] = False
            rest = index[~positive]
            if rest.size == 0:
                break
            trial, mask = trial[~positive], mask[~positive]
            current = z[rest]
            stalled = (trial[np.arange(rest.size), entering[rest]] <= 0) & (
                current[np.arange(rest.size), entering[rest]] == 0
            )
            # The entering column improves the objective by less than rounding: that row is
            # optimal as it stands.
            passive[rest[stalled], entering[rest[stalled]]] = False
            running[rest[stalled]] = False
            inner[rest[stalled]] = False
            keep = ~stalled
            rest, trial, mask, current = rest[keep], trial[keep], mask[keep], current[keep]
            blocking = mask & (trial <= 0)
            ratios = np.where(blocking, current / np.where(blocking, current - trial, 1.0), np.inf)
            step = ratios.min(axis=1, keepdims=True)
            current = current + step * (trial - current)
            still = passive[rest] & (current > tolerance)
            passive[rest] = still
            z[rest] = np.where(still, current, 0.0)
        else:  # pragma: no cover - as in nnls_gram
            raise SolverError("the active-set NNLS solver cycled")
    raise SolverError(
        f"the active-set NNLS solver did not converge in {3 * n} iterations; "
        "the Gramian is likely too ill-conditioned for float64"
    )


def _solve_passive(matrix: np.ndarray, targets: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """Each row's ``M_PP x_P = c_P`` (``x = 0`` off ``P``), batched; row by row with least
    squares when a block is singular."""
    outer = passive[:, :, None] & passive[:, None, :]
    blocks = np.where(outer, matrix[None], 0.0)
    diagonal = np.arange(matrix.shape[0])
    blocks[:, diagonal, diagonal] += ~passive  # the identity off the passive set
    rhs = np.where(passive, targets, 0.0)
    try:
        solution = np.linalg.solve(blocks, rhs[:, :, None])[:, :, 0]
        if np.isfinite(solution).all():
            return np.where(passive, solution, 0.0)
    except np.linalg.LinAlgError:
        pass
    solution = np.zeros_like(targets)
    for k, mask in enumerate(passive):
        indices = np.flatnonzero(mask)
        solution[k, indices] = _solve_psd(matrix[np.ix_(indices, indices)], targets[k, indices])
    return solution


def _solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``M x = b`` for a small PSD ``M``; least squares when ``M`` is singular."""
    try:
        solution = np.linalg.solve(matrix, rhs)
        if np.isfinite(solution).all():
            return solution
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def min_norm_simplex(gramian: np.ndarray) -> np.ndarray:
    """The weights ``w`` on the simplex that minimize ``w^T G w`` (MGDA's problem).

    ``J^T w`` is then the minimum-norm point of the convex hull of the rows of ``J``. Solved
    exactly through one NNLS: with ``z = s w`` (``s >= 0``, ``w`` on the simplex),
    ``min_{z >= 0} ||J^T z||^2 + (1^T z - 1)^2 = q / (1 + q)`` for ``q = w^T G w``, increasing in
    ``q``, so the NNLS minimizer is ``s w*``: Gram matrix ``G + 1 1^T``, target ``1``.

    When several ``w`` reach the minimum (a rank-deficient ``G``), one of them is returned;
    ``J^T w`` is unique. All-zero gradients give the uniform weights.

    Examples
    --------
    >>> import numpy as np
    >>> from gradsurgery._linalg import min_norm_simplex
    >>> min_norm_simplex(np.array([[1.0, 0.0], [0.0, 4.0]])).round(6)
    array([0.8, 0.2])
    """
    num_tasks = gramian.shape[0]
    if num_tasks <= _PYTHON_MAX_SIZE:
        return np.array(min_norm_simplex_small(gramian.tolist()))
    scale = scale_of(gramian)
    if scale == 0.0:
        return np.full(num_tasks, 1.0 / num_tasks)
    # The weights do not change when G is scaled; a unit scale makes the tolerances absolute.
    matrix = gramian / scale + 1.0
    # Starting from every task and dropping the ones with no weight takes a few solves where
    # adding tasks one by one takes one per task in the support (7 ms -> 0.3 ms at T = 50).
    z = nnls_gram(matrix, np.ones(num_tasks), initial=np.ones(num_tasks, dtype=bool))
    total = z.sum()
    if not total > 0:  # pragma: no cover - z = 0 is never optimal since c = 1 > 0
        raise SolverError("the minimum-norm solver returned zero weights")
    return z / total


def min_norm_simplex_small(gramian: list[list[float]]) -> list[float]:
    """:func:`min_norm_simplex` on Python floats, for at most ``_PYTHON_MAX_SIZE`` tasks."""
    num_tasks = len(gramian)
    scale = max([gramian[i][i] for i in range(num_tasks)])
    if scale == 0.0:
        return [1.0 / num_tasks] * num_tasks
    matrix = [[value / scale + 1.0 for value in row] for row in gramian]
    z = nnls_gram_small(matrix, [1.0] * num_tasks)
    total = sum(z)
    if not total > 0:  # pragma: no cover - as in min_norm_simplex
        raise SolverError("the minimum-norm solver returned zero weights")
    return [value / total for value in z]


def project_dual_cone(gramian: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weights ``v`` of the projection of ``J^T u`` onto the dual cone of the rows of ``J``.

    The dual cone is ``{x : J x >= 0}``. By Proposition 1 of Quinton and Rey (2024), the
    projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v``: with ``v = u + z`` an NNLS in
    Gram form (``M = G``, ``c = -G u``). Exact: ``G v >= 0`` (the result conflicts with no row)
    up to rounding.

    Parameters
    ----------
    gramian : numpy.ndarray
        ``[T, T]`` Gramian ``G = J J^T``.
    weights : numpy.ndarray
        ``[T]`` or ``[K, T]`` weights ``u`` (one projection per row).

    Returns
    -------
    numpy.ndarray
        The weights ``v``, same shape as ``weights``.

    Examples
    --------
    >>> import numpy as np
    >>> from gradsurgery._linalg import project_dual_cone
    >>> project_dual_cone(np.array([[1.0, -1.0], [-1.0, 4.0]]), np.array([1.0, 0.0]))
    array([1.  , 0.25])
    """
    if gramian.shape[0] <= _PYTHON_MAX_SIZE:
        projected = project_dual_cone_small(gramian.tolist(), np.atleast_2d(weights).tolist())
        return np.array(projected).reshape(weights.shape)
    scale = scale_of(gramian)
    rows = np.atleast_2d(weights).astype(np.float64)
    if scale == 0.0:
        return rows.reshape(weights.shape).copy()
    matrix = gramian / scale
    # One row runs Lawson-Hanson on NumPy up to _GATHER_MIN_SIZE tasks: there the batched
    # exchange's torch calls cost more than the few columns entering (T = 10: 230 -> 430 us);
    # beyond, the exchange's few rounds win (T = 50: 900 -> 520 us).
    if rows.shape[0] > 1 or matrix.shape[0] > _GATHER_MIN_SIZE:
        try:
            return (rows + nnls_gram_rows(matrix, -(rows @ matrix))).reshape(weights.shape)
        except SolverError:
            # A least-squares block (numerically dependent gradients) for one row changes the
            # others' steps in the batch; row by row, each row keeps its own.
            pass
    projected = np.array([u + nnls_gram(matrix, -(matrix @ u)) for u in rows])
    return projected.reshape(weights.shape)


def project_dual_cone_small(
    gramian: list[list[float]], weights: list[list[float]]
) -> list[list[float]]:
    """:func:`project_dual_cone` on Python floats, for at most ``_PYTHON_MAX_SIZE`` tasks: the
    projection of each row of ``weights``."""
    scale = max([gramian[i][i] for i in range(len(gramian))])
    if scale == 0.0:
        return [list(u) for u in weights]
    matrix = [[value / scale for value in row] for row in gramian]
    magnitude = max([max(map(abs, row)) for row in matrix])
    projected = []
    for u in weights:
        target = [-sum(map(operator.mul, row, u)) for row in matrix]
        z = nnls_gram_small(matrix, target, magnitude)
        projected.append([a + b for a, b in zip(u, z, strict=True)])
    return projected


def as_task_vector(values: object, num_tasks: int, name: str) -> np.ndarray:
    """``values`` (a sequence or 1-D tensor of ``num_tasks`` finite numbers) as float64."""
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
        array = values.detach().to("cpu").double().numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of numbers or a 1-D tensor") from None
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.shape[0] != num_tasks:
        raise ValueError(f"{name} must have one entry per task ({num_tasks}), got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return array


def check_number(
    value: object,
    name: str,
    *,
    low: float = 0.0,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    return check_real(name, value, low=low, high=high, low_open=low_open)


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an ``int >= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def normalize_and_regularize(gramian: np.ndarray, norm_eps: float, reg_eps: float) -> np.ndarray:
    """torchjd's conditioning of a Gramian before its dual-cone projection.

    ``G / trace(G) + reg_eps I``, with ``G`` taken as zero when ``trace(G) < norm_eps``. With
    ``norm_eps = reg_eps = 0`` the Gramian is returned unchanged (the exact projection).
    """
    if norm_eps == 0.0 and reg_eps == 0.0:
        return gramian
    trace = float(gramian.trace())
    normalized = np.zeros_like(gramian) if trace < norm_eps or trace == 0 else gramian / trace
    return normalized + reg_eps * np.eye(gramian.shape[0])


def preference_weights(pref_vector: object, num_tasks: int) -> np.ndarray:
    """A preference vector as float64 weights: the mean weights ``1 / T`` when ``None``."""
    if pref_vector is None:
        return np.full(num_tasks, 1.0 / num_tasks)
    return as_task_vector(pref_vector, num_tasks, "pref_vector")
