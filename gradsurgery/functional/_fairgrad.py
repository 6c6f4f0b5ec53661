"""FairGrad (Ban & Ji 2024): alpha-fair task weights from the Gramian."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._gramians import check_count, check_real, gramian_array

__all__ = ["fairgrad_weights"]

# clip_grad_norm_'s guard against a zero norm, kept so that max_norm clips as the authors' code.
_CLIP_EPS = 1e-6


def fairgrad_weights(
    gramian: Tensor,
    alpha: float = 1.0,
    *,
    rescale: bool = True,
    max_norm: float = 0.0,
    tol: float = 1e-8,
    max_iter: int = 100,
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

    Returns
    -------
    Tensor
        ``[T]`` float64 weights. A task whose gradient is zero gets weight 0 (its weight does
        not change the update; the others are solved among themselves); if every gradient is
        zero, all weights are 0.

    Raises
    ------
    ValueError
        When the equation has no positive solution: the gradients are Pareto-stationary, some
        nonnegative combination of them is zero (e.g. two exactly opposite gradients), so no
        update improves every task. Also on a bad Gramian or hyper-parameter.

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
    """
    G = gramian_array(gramian)
    alpha = check_real(alpha, "alpha", low=0.0)
    max_norm = check_real(max_norm, "max_norm", low=0.0)
    tol = check_real(tol, "tol", low=0.0, low_open=True)
    max_iter = check_count(max_iter, "max_iter")
    weights = _fairgrad_weights(G, alpha, rescale, max_norm, tol, max_iter)
    return torch.from_numpy(weights)


def _fairgrad_weights(
    G: np.ndarray, alpha: float, rescale: bool, max_norm: float, tol: float, max_iter: int
) -> np.ndarray:
    num_tasks = G.shape[0]
    if alpha == 0.0:  # linear scalarization (Section 3 of the paper)
        weights = np.full(num_tasks, 1.0 / num_tasks)
    else:
        weights = np.zeros(num_tasks)
        active = np.flatnonzero(G.diagonal() > 0)
        if active.size:
            weights[active] = _solve(G[np.ix_(active, active)], alpha, tol, max_iter)
    if rescale:
        weights *= num_tasks
    if max_norm > 0:
        norm = math.sqrt(max(float(weights @ G @ weights), 0.0))
        weights *= min(1.0, max_norm / (norm + _CLIP_EPS))
    return weights


def _solve(G: np.ndarray, alpha: float, tol: float, max_iter: int) -> np.ndarray:
    """The positive root of ``G w = w^(-1/alpha)``, for a Gramian with a positive diagonal."""
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
            return w * scale ** (-alpha / (1.0 + alpha))
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
    raise ValueError(
        "FairGrad found no positive solution of G w = w^(-1/alpha) within "
        f"{max_iter} Newton steps: "
        "the task gradients are (close to) Pareto-stationary, some nonnegative combination of "
        "them is zero (e.g. two exactly opposite gradients), so no update improves every task. "
        "Skip this step, or use a method defined there (MGDA gives a zero update)"
    )
