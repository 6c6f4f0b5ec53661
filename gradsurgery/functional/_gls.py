"""Geometric loss strategy (Chennupati et al. 2019): the weights of ``(prod_i L_i)^(1/T)``."""

from __future__ import annotations

import math

from torch import Tensor

from ._losses import FloatVector, as_floats, float64, require_positive

__all__ = ["gls_weights"]


def gls_weights(losses: FloatVector) -> Tensor:
    """The gradient of the geometric mean ``(prod_i L_i)^(1/T)`` with respect to the losses.

    ``w_i = GM / (T L_i)``: the update of GLS is the weighted sum ``sum_i w_i grad L_i``. A task
    with a small loss gets a large weight: GLS balances the losses' relative, not absolute,
    decrease.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` positive losses (the geometric mean's gradient does not exist at a zero loss).

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> from gradsurgery.functional import gls_weights
    >>> gls_weights([1.0, 4.0])
    tensor([1.0000, 0.2500], dtype=torch.float64)
    """
    losses = as_floats(losses, "losses")
    require_positive(losses, "GLS")
    return float64(_gls_weights(losses))


def _gls_weights(losses: list[float]) -> list[float]:
    num_tasks = len(losses)
    # In log space: the product itself under- or overflows, and GM / L_i = exp(mean - log L_i)
    # is exact where the two are equal (one task gets exactly 1).
    logs = [math.log(loss) for loss in losses]
    mean = math.fsum(logs) / num_tasks
    try:
        return [math.exp(mean - log) / num_tasks for log in logs]
    except OverflowError:
        raise ValueError(
            "GLS's weight GM / (T L_i) of the smallest loss overflows float64: the losses "
            f"span {min(losses):.3g} to {max(losses):.3g}; rescale the losses"
        ) from None
