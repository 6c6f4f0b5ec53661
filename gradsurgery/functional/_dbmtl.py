"""DB-MTL (Lin et al. 2023, dual-balancing): log-transformed losses, and their gradients
rescaled to the largest (averaged) gradient norm."""

from __future__ import annotations

import math

from torch import Tensor

from ._losses import FloatVector, float64, require_positive, task_vectors

__all__ = ["dbmtl_weights"]

EPSILON = 1e-8  # the authors' constant, in log(L + eps) and in the norm ratio


def dbmtl_weights(
    losses: FloatVector,
    grad_norms: FloatVector,
    norm_average: FloatVector | None = None,
    *,
    step: int = 1,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """DB-MTL's weights on the task gradients, and the updated average of the log-gradient norms.

    Loss balancing: task ``i`` descends ``log(L_i + eps)``, whose gradient is
    ``g_i / (L_i + eps)``, of norm ``n_i = ||g_i|| / (L_i + eps)``. Gradient balancing: the norms
    are averaged, ``m_i <- n_i + beta_t (m_i - n_i)`` with ``beta_t = beta / step^beta_sigma``
    (from ``m = 0`` at step 1, as the authors' code), and every task's gradient is rescaled to
    the largest average norm ``M = max_j m_j``: the update is
    ``sum_i M m_i / (m_i + eps) g_i / ||g_i||``, so ``w_i = M m_i / ((m_i + eps) ||g_i||)``
    (``0`` for a zero gradient).

    The authors' code averages the log-gradient *vectors* ``b_i`` and combines them as
    ``sum_i M b_i / (||b_i|| + eps)``; this function averages their norms and combines the
    current gradients, which needs ``T`` norms instead of a ``[T, P]`` buffer. The two are the
    same update whenever no task's gradient changes direction from step to step (the average
    of parallel vectors has the average norm), in particular at every step with ``beta = 0``.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` positive losses.
    grad_norms : sequence of float or Tensor
        ``[T]`` norms ``||g_i||`` of the task gradients on the shared parameters.
    norm_average : sequence of float or Tensor, optional
        ``[T]`` average ``m`` of the previous step; zeros (the start) when ``None``.
    step : int
        This step's number, from 1.
    beta, beta_sigma : float
        The average's decay ``beta`` in ``[0, 1)`` (default 0.9) and its decay exponent
        ``beta_sigma >= 0`` (default 0: a constant ``beta``), the authors' defaults.

    Returns
    -------
    weights : Tensor
        ``[T]`` float64 weights of the task gradients.
    norm_average : Tensor
        ``[T]`` float64 average ``m`` after this step. All zero (every gradient zero so far)
        gives zero weights: there is nothing to balance.

    Examples
    --------
    >>> from gradsurgery.functional import dbmtl_weights
    >>> weights, average = dbmtl_weights([1.0, 2.0], [4.0, 1.0], beta=0.0)  # no averaging
    >>> weights
    tensor([1.0000, 4.0000], dtype=torch.float64)
    >>> average
    tensor([4.0000, 0.5000], dtype=torch.float64)
    """
    losses, grad_norms, norm_average = task_vectors(
        losses=losses, grad_norms=grad_norms, norm_average=norm_average
    )
    norm_average = norm_average or [0.0] * len(losses)
    require_positive(losses, "DB-MTL (log-transformed losses)")
    if min(grad_norms) < 0 or min(norm_average) < 0:
        raise ValueError("grad_norms and norm_average must be non-negative")
    check_betas(beta, beta_sigma)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    weights, average = _dbmtl_weights(losses, grad_norms, norm_average, step, beta, beta_sigma)
    return float64(weights), float64(average)


def check_betas(beta: float, beta_sigma: float) -> None:
    if not (isinstance(beta, int | float) and 0 <= beta < 1):
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    if not (isinstance(beta_sigma, int | float) and math.isfinite(beta_sigma) and beta_sigma >= 0):
        raise ValueError(f"beta_sigma must be a finite number >= 0, got {beta_sigma!r}")


def _dbmtl_weights(
    losses: list[float],
    grad_norms: list[float],
    norm_average: list[float],
    step: int,
    beta: float,
    beta_sigma: float,
) -> tuple[list[float], list[float]]:
    decay = beta / step**beta_sigma
    log_norms = [n / (loss + EPSILON) for n, loss in zip(grad_norms, losses, strict=True)]
    average = [n + decay * (m - n) for n, m in zip(log_norms, norm_average, strict=True)]
    largest = max(average)
    weights = [
        largest * m / ((m + EPSILON) * n) if n > 0 else 0.0
        for m, n in zip(average, grad_norms, strict=True)
    ]
    return weights, average
