"""FairGrad (Ban & Ji 2024): alpha-fair task weights from the Gramian."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._linalg import as_gramian, check_number, check_positive_int, solve_psd_block
from ._fairgrad_least_squares import least_squares_weights

__all__ = ["fairgrad_weights"]

# clip_grad_norm_'s guard against a zero norm, kept so that max_norm clips as the authors' code.
_CLIP_EPS = 1e-6

# What to do where the equation has no positive root (Pareto-stationary gradients).
ON_NO_ROOT = ("least_squares", "raise")


def fairgrad_weights(
    gramian: Tensor,
    alpha: float = 1.0,
    *,
    rescale: bool = True,
    max_norm: float = 0.0,
    tol: float = 1e-8,
    max_iter: int = 100,
    on_no_root: str = "least_squares",
) -> Tensor:
    r"""FairGrad's alpha-fair task weights (Ban & Ji 2024, eq. 4).

    The update :math:`d = \sum_i w_i g_i` gives every task the utility :math:`g_i \cdot d`;
    FairGrad takes the :math:`\alpha`-fair allocation, whose weights solve

    .. math:: G w = w^{-1/\alpha} \quad (\text{element-wise}), \qquad w > 0,

    i.e. :math:`g_i \cdot d = w_i^{-1/\alpha}` for every task. ``alpha = 0`` is the uniform
    weighting (linear scalarization), ``alpha = 1`` proportional fairness, large ``alpha``
    tends to max-min fairness.

    The solution is the minimizer of the strictly convex
    :math:`\tfrac12 w^\top G w + \sum_i \phi(w_i)` with :math:`\phi'(w) = -w^{-1/\alpha}`,
    found by damped Newton steps in float64 on a Gramian normalized by its largest diagonal
    entry, then scaled back: the weights of :math:`sG` are :math:`s^{-\alpha/(1+\alpha)}` times
    those of :math:`G`.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian of the task gradients.
    alpha : float
        Fairness parameter, ``>= 0``.
    rescale : bool
        Multiply the weights by ``T``, as the authors' code does to keep the scale of the
        summed loss (default). ``False`` gives the solution of the equation itself (torchjd's
        ``FairGrad``).
    max_norm : float
        When positive, scale the weights down so that the combined gradient's norm
        :math:`\sqrt{w^\top G w}` is at most ``max_norm``, exactly as
        ``torch.nn.utils.clip_grad_norm_`` on the shared parameters in the authors' code (which
        uses ``max_norm=1.0``). ``0`` (default) does not clip.
    tol : float
        Convergence: every equation holds to this relative accuracy; one more Newton step
        follows, which takes a well-conditioned problem to rounding level.
    max_iter : int
        Newton steps allowed.
    on_no_root : {"least_squares", "raise"}
        Where the Newton steps find no positive root within ``max_iter`` (the gradients are
        Pareto-stationary, or so close to it that the root is out of float64's reach):
        ``"least_squares"`` (default) returns what the authors' code returns there, the
        weights where bounded least squares on :math:`\lVert G w - w^{-1/\alpha}\rVert^2`
        from :math:`w = 1/T` stops (SciPy's default tolerances, on the normalized Gramian);
        ``"raise"`` raises a ``ValueError`` instead.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights. A task whose gradient is zero gets weight 0 (its weight does
        not change the update; the others are solved among themselves); if every gradient is
        zero, all weights are 0.

    Raises
    ------
    ValueError
        With ``on_no_root="raise"``, when the equation has no positive solution: the gradients
        are Pareto-stationary, some nonnegative combination of them is zero (e.g. two exactly
        opposite gradients), so no update improves every task. Also on a bad Gramian or
        hyper-parameter.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import fairgrad_weights
    >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]])   # orthogonal gradients, norms 2 and 1
    >>> w = fairgrad_weights(G, alpha=1.0, rescale=False)
    >>> w                                              # w_i = 1 / ||g_i||
    tensor([0.5000, 1.0000], dtype=torch.float64)
    >>> G.double() @ w * w                             # G w = 1 / w
    tensor([1., 1.], dtype=torch.float64)
    >>> opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])   # g_2 = -g_1: no root
    >>> w = fairgrad_weights(opposite, rescale=False)     # the authors' least-squares point
    >>> bool((w > 0).all()), bool(w[0] == w[1])
    (True, True)
    """
    G = as_gramian(gramian)
    alpha = check_number(alpha, "alpha", low=0.0)
    max_norm = check_number(max_norm, "max_norm", low=0.0)
    tol = check_number(tol, "tol", low=0.0, low_open=True)
    max_iter = check_positive_int(max_iter, "max_iter")
    on_no_root = check_on_no_root(on_no_root)
    weights = _fairgrad_weights(G.tolist(), alpha, rescale, max_norm, tol, max_iter, on_no_root)
    return torch.from_numpy(np.array(weights))


def check_on_no_root(on_no_root: str) -> str:
    """``on_no_root`` if it is one of :data:`ON_NO_ROOT`, else a ``ValueError``."""
    if on_no_root not in ON_NO_ROOT:
        raise ValueError(f"on_no_root must be one of {ON_NO_ROOT}, got {on_no_root!r}")
    return on_no_root


def _fairgrad_weights(
    gram: list[list[float]],
    alpha: float,
    rescale: bool,
    max_norm: float,
    tol: float,
    max_iter: int,
    on_no_root: str = "least_squares",
) -> list[float]:
    """The weights, from the Gramian as ``T`` lists of ``T`` floats."""
    num_tasks = len(gram)
    if alpha == 0.0:  # linear scalarization (Section 3 of the paper)
        weights = [1.0 / num_tasks] * num_tasks
    else:
        weights = [0.0] * num_tasks
        active = [i for i in range(num_tasks) if gram[i][i] > 0]
        if active:
            sub = [[gram[i][k] for k in active] for i in active]
            solve = _solve_python if len(active) <= _PYTHON_MAX_TASKS else _solve_numpy
            root = solve(sub, alpha, tol, max_iter)
            if root is None:
                if on_no_root == "raise":
                    raise _no_root(max_iter)
                root = _least_squares(sub, alpha)
            for i, weight in zip(active, root, strict=True):
                weights[i] = weight
    if rescale:
        weights = [num_tasks * weight for weight in weights]
    if max_norm > 0:
        products = (sum(map(float.__mul__, row, weights)) for row in gram)  # G w
        squared = sum(map(float.__mul__, weights, products))
        factor = min(1.0, max_norm / (math.sqrt(max(squared, 0.0)) + _CLIP_EPS))
        weights = [factor * weight for weight in weights]
    return weights


def _least_squares(gram: list[list[float]], alpha: float) -> list[float]:
    """The bounded least-squares weights, solved on the Gramian normalized as the root is:
    ``||s A w - w^(-1/alpha)||^2 = s^(2/(1+alpha)) ||A v - v^(-1/alpha)||^2`` with
    ``w = s^(-alpha/(1+alpha)) v``, so the normalization maps the problem onto itself."""
    scale = max(gram[i][i] for i in range(len(gram)))
    normalized = [[entry / scale for entry in row] for row in gram]
    factor = scale ** (-alpha / (1.0 + alpha))
    return [factor * weight for weight in least_squares_weights(normalized, alpha)]


def _no_root(max_iter: int) -> ValueError:
    return ValueError(
        "FairGrad found no positive solution of G w = w^(-1/alpha) within "
        f"{max_iter} Newton steps: the task gradients are (close to) Pareto-stationary, some "
        "nonnegative combination of them is zero (e.g. two exactly opposite gradients), so no "
        "update improves every task. Pass on_no_root='least_squares' for the authors' "
        "least-squares weights there, skip this step, or use a method defined there (MGDA "
        "gives a zero update)"
    )


# Up to this many tasks the Newton steps run on Python floats: for a 3 x 3 system, a NumPy call
# costs more than the arithmetic it does.
_PYTHON_MAX_TASKS = 6


def _solve_python(
    gram: list[list[float]], alpha: float, tol: float, max_iter: int
) -> list[float] | None:
    """:func:`_solve_numpy`'s iteration, on Python floats (``L D L^T`` for the Newton system)."""
    n = len(gram)
    scale = max(gram[i][i] for i in range(n))
    A = [[entry / scale for entry in row] for row in gram]
    p = 1.0 / alpha
    w = [A[i][i] ** (-1.0 / (1.0 + p)) for i in range(n)]

    def objective(x: list[float]) -> float:
        quadratic = sum(xi * sum(map(float.__mul__, row, x)) for xi, row in zip(x, A, strict=True))
        if p == 1.0:
            return 0.5 * quadratic - sum(map(math.log, x))
        return 0.5 * quadratic + sum(xi ** (1.0 - p) for xi in x) / (p - 1.0)

    value = objective(w)
    indices = list(range(n))
    for _ in range(max_iter):
        target = [wi**-p for wi in w]
        residual = [sum(map(float.__mul__, row, w)) - ti for row, ti in zip(A, target, strict=True)]
        converged = all(abs(r) <= tol * ti for r, ti in zip(residual, target, strict=True))
        hessian = [row[:] for row in A]
        for i in indices:
            hessian[i][i] += p * target[i] / w[i]
        step = solve_psd_block(hessian, indices, [-r for r in residual], 0.0)
        if step is None:  # the weights grew until the barrier vanished: no root
            break
        if converged:  # one more full step: Newton's quadratic rate takes it to rounding level
            polished = [wi + si for wi, si in zip(w, step, strict=True)]
            w = polished if min(polished) > 0 else w
            return [wi * scale ** (-alpha / (1.0 + alpha)) for wi in w]
        decrease = sum(map(float.__mul__, residual, step))
        t = 1.0
        for wi, si in zip(w, step, strict=True):
            if si < 0:
                t = min(t, 0.99 * wi / -si)
        close = -decrease <= 1e-8 * (abs(value) + 1.0)
        while True:
            candidate = [wi + t * si for wi, si in zip(w, step, strict=True)]
            candidate_value = objective(candidate)
            if close or candidate_value <= value + 0.25 * t * decrease or t < 1e-12:
                break
            t *= 0.5
        w, value = candidate, candidate_value
    return None


def _solve_numpy(
    gram: list[list[float]], alpha: float, tol: float, max_iter: int
) -> list[float] | None:
    """The positive root of ``G w = w^(-1/alpha)``, for a Gramian with a positive diagonal;
    ``None`` when ``max_iter`` Newton steps find none."""
    G = np.array(gram)
    scale = float(G.diagonal().max())
    A = G / scale
    p = 1.0 / alpha
    # The root of the diagonal part: exact when the gradients are orthogonal.
    w = A.diagonal() ** (-1.0 / (1.0 + p))

    def objective(x: np.ndarray) -> float:
        barrier = -np.log(x).sum() if p == 1.0 else (x ** (1.0 - p)).sum() / (p - 1.0)
        return 0.5 * float(x @ A @ x) + float(barrier)

    value = objective(w)
    for _ in range(max_iter):
        target = w**-p
        residual = A @ w - target  # the objective's gradient
        # Relative to the target, not to the magnitudes of G's terms: near a Pareto-stationary
        # point, huge weights whose combination cancels would pass the looser test.
        converged = (np.abs(residual) <= tol * target).all()
        hessian = A + np.diag(p * target / w)
        try:
            step = -np.linalg.solve(hessian, residual)
        except np.linalg.LinAlgError:  # the weights grew until the barrier vanished: no root
            break
        if converged:  # one more full step: Newton's quadratic rate takes it to rounding level
            polished = w + step
            w = polished if (polished > 0).all() else w
            return (w * scale ** (-alpha / (1.0 + alpha))).tolist()
        decrease = float(residual @ step)  # < 0: the Hessian is positive definite
        # Stay inside w > 0, then backtrack until the objective decreases enough (Armijo).
        shrinking = step < 0
        t = (
            min(1.0, 0.99 * float((w[shrinking] / -step[shrinking]).min()))
            if shrinking.any()
            else 1.0
        )
        # Near the root the decrease is below the objective's rounding: take the full step.
        close = -decrease <= 1e-8 * (abs(value) + 1.0)
        while True:
            candidate = w + t * step
            candidate_value = objective(candidate)
            if close or candidate_value <= value + 0.25 * t * decrease or t < 1e-12:
                break
            t *= 0.5
        w, value = candidate, candidate_value
    return None
