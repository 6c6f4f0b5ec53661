"""Uncertainty weighting (Kendall, Gal & Cipolla 2018): the weights and the log-variances'
gradient of ``sum_i 1/2 exp(-s_i) L_i + 1/2 s_i``."""

from __future__ import annotations

from torch import Tensor

from ._losses import FloatVector, as_floats, exp_weights, float64, require_positive, task_vectors

__all__ = ["uw_log_variance_gradient", "uw_weights"]


def uw_weights(log_variances: FloatVector) -> Tensor:
    """Uncertainty weighting's task weights ``w_i = exp(-s_i) / 2``.

    They are the derivatives of the objective ``sum_i exp(-s_i) L_i / 2 + s_i / 2`` with
    respect to the losses, for the log-variances ``s_i = log sigma_i^2``.

    Parameters
    ----------
    log_variances : sequence of float or Tensor
        ``[T]`` log-variances ``s``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> from gradsurgery.functional import uw_weights
    >>> uw_weights([0.0, 2.0])
    tensor([0.5000, 0.0677], dtype=torch.float64)
    """
    return float64(_uw_weights(as_floats(log_variances, "log_variances")))


def uw_log_variance_gradient(losses: FloatVector, log_variances: FloatVector) -> Tensor:
    """Gradient of the uncertainty-weighting objective with respect to the log-variances.

    ``d/ds_i (exp(-s_i) L_i / 2 + s_i / 2) = (1 - exp(-s_i) L_i) / 2``: zero at
    ``s_i = log L_i``, the objective's minimum over ``s_i`` for a positive loss.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` non-negative losses (a negative loss has no minimum over ``s_i``: refused).
    log_variances : sequence of float or Tensor
        ``[T]`` log-variances ``s``.

    Returns
    -------
    Tensor
        ``[T]`` float64 gradient.

    Examples
    --------
    >>> import math
    >>> from gradsurgery.functional import uw_log_variance_gradient
    >>> uw_log_variance_gradient([1.0, 4.0], [0.0, math.log(4.0)])
    tensor([0., 0.], dtype=torch.float64)
    """
    losses, log_variances = task_vectors(losses=losses, log_variances=log_variances)
    require_positive(losses, "uncertainty weighting", zero=True)
    return float64(_uw_gradient(losses, _uw_weights(log_variances)))


def _uw_weights(log_variances: list[float]) -> list[float]:
    return exp_weights(log_variances, "log_variances", sign=-1.0, scale=0.5)


def _uw_gradient(losses: list[float], weights: list[float]) -> list[float]:
    return [0.5 - w * loss for w, loss in zip(weights, losses, strict=True)]
