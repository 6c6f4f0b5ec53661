"""IMTL-L (Liu et al. 2021): the weights and the scales' gradient of
``sum_i exp(s_i) L_i - s_i``."""

from __future__ import annotations

from torch import Tensor

from ._losses import FloatVector, as_floats, exp_weights, float64, require_positive, task_vectors

__all__ = ["imtl_l_scale_gradient", "imtl_l_weights"]


def imtl_l_weights(log_scales: FloatVector) -> Tensor:
    """IMTL-L's task weights ``w_i = exp(s_i)``: the losses' derivatives of
    ``sum_i exp(s_i) L_i - s_i``.

    Parameters
    ----------
    log_scales : sequence of float or Tensor
        ``[T]`` learned log-scales ``s``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> import math
    >>> from gradsurgery.functional import imtl_l_weights
    >>> imtl_l_weights([0.0, math.log(3.0)])
    tensor([1.0000, 3.0000], dtype=torch.float64)
    """
    return float64(_imtl_l_weights(as_floats(log_scales, "log_scales")))


def imtl_l_scale_gradient(losses: FloatVector, log_scales: FloatVector) -> Tensor:
    """Gradient of IMTL-L's objective with respect to the log-scales: ``exp(s_i) L_i - 1``.

    It vanishes where every scaled loss ``exp(s_i) L_i`` equals one: the balance IMTL-L seeks.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` non-negative losses (a negative loss has no minimum over ``s_i``: refused).
    log_scales : sequence of float or Tensor
        ``[T]`` log-scales ``s``.

    Returns
    -------
    Tensor
        ``[T]`` float64 gradient.

    Examples
    --------
    >>> import math
    >>> from gradsurgery.functional import imtl_l_scale_gradient
    >>> imtl_l_scale_gradient([2.0, 0.5], [-math.log(2.0), 0.0])
    tensor([ 0.0000, -0.5000], dtype=torch.float64)
    """
    losses, log_scales = task_vectors(losses=losses, log_scales=log_scales)
    require_positive(losses, "IMTL-L", zero=True)
    return float64(_imtl_l_gradient(losses, _imtl_l_weights(log_scales)))


def _imtl_l_weights(log_scales: list[float]) -> list[float]:
    return exp_weights(log_scales, "log_scales", sign=1.0, scale=1.0)


def _imtl_l_gradient(losses: list[float], weights: list[float]) -> list[float]:
    return [w * loss - 1.0 for w, loss in zip(weights, losses, strict=True)]
