"""Dynamic Weight Average (Liu, Johns & Davison 2019, eq. 7)."""

from __future__ import annotations

import math

from torch import Tensor

from ._losses import FloatVector, float64, require_positive, require_positive_number, task_vectors

__all__ = ["dwa_weights"]


def dwa_weights(last: FloatVector, before_last: FloatVector, temperature: float = 2.0) -> Tensor:
    """DWA's weights ``w_k = K softmax_k(r / temperature)``, ``r_k = last_k / before_last_k``.

    ``last`` and ``before_last`` are the average losses of the two latest windows (epochs in
    the paper): a task whose loss fell less than the others' gets more weight. The weights sum
    to ``K``, the number of tasks.

    Parameters
    ----------
    last : sequence of float or Tensor
        ``[K]`` average losses of the latest window, ``L(t - 1)``; positive.
    before_last : sequence of float or Tensor
        ``[K]`` average losses of the window before, ``L(t - 2)``; positive.
    temperature : float
        ``T > 0`` (default 2, the paper's); a larger one makes the weights more uniform.

    Returns
    -------
    Tensor
        ``[K]`` float64 weights.

    Raises
    ------
    ValueError
        A loss that is zero or negative (the descending rate is a ratio of positive losses),
        or a temperature that is not a finite positive number.

    Examples
    --------
    >>> from gradsurgery.functional import dwa_weights
    >>> dwa_weights([1.0, 1.0], [2.0, 1.0])
    tensor([0.8756, 1.1244], dtype=torch.float64)
    """
    last, before_last = task_vectors(last=last, before_last=before_last)
    require_positive(last, "DWA")
    require_positive(before_last, "DWA")
    require_positive_number(temperature, "temperature")
    return float64(_dwa_weights(last, before_last, temperature))


def _dwa_weights(last: list[float], before_last: list[float], temperature: float) -> list[float]:
    scaled = [a / b / temperature for a, b in zip(last, before_last, strict=True)]
    top = max(scaled)  # exp of at most 0: no overflow
    if top == math.inf:
        raise ValueError("a DWA loss ratio overflows float64: the losses fell by over 1e308")
    exps = [math.exp(x - top) for x in scaled]
    factor = len(exps) / sum(exps)
    return [e * factor for e in exps]
