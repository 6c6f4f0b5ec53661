"""Smooth Tchebycheff scalarization (Lin et al. 2024)."""

from __future__ import annotations

import math

from torch import Tensor

from ._losses import (
    FloatVector,
    as_floats,
    float64,
    require_positive,
    require_positive_number,
    task_vectors,
)

__all__ = ["stch_log_weights", "stch_weights"]

LOG_EPSILON = 1e-20  # the authors' constant inside the logarithm


def stch_weights(
    values: FloatVector,
    mu: float = 1.0,
    *,
    preferences: FloatVector | None = None,
    ideal_point: FloatVector | None = None,
) -> Tensor:
    """The gradient of ``mu log sum_i exp(lambda_i (f_i - z_i) / mu)`` with respect to ``f``.

    The smooth Tchebycheff scalarization (the paper's eq. 8) of the objective values ``f`` with
    preferences ``lambda`` and ideal point ``z``; its gradient is
    ``w_i = lambda_i softmax_i(lambda (f - z) / mu)``. As ``mu -> 0`` the weight concentrates on
    the worst weighted objective.

    Parameters
    ----------
    values : sequence of float or Tensor
        ``[T]`` objective values ``f`` (any sign).
    mu : float
        Smoothing ``mu > 0``.
    preferences : sequence of float or Tensor, optional
        ``[T]`` non-negative preferences; ``1/T`` each when ``None``.
    ideal_point : sequence of float or Tensor, optional
        ``[T]`` ideal point ``z``; zeros when ``None``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> from gradsurgery.functional import stch_weights
    >>> stch_weights([1.0, 1.0], mu=0.1)
    tensor([0.2500, 0.2500], dtype=torch.float64)
    """
    values = as_floats(values, "values")
    require_positive_number(mu, "mu")
    preferences, ideal_point = _preferences(values, preferences, ideal_point)
    return float64(_stch_weights(values, mu, preferences, ideal_point))


def stch_log_weights(losses: FloatVector, normalizer: FloatVector, mu: float = 1.0) -> Tensor:
    """The authors' STCH for multi-task learning: the loss weights of
    ``T mu log sum_i exp(log(L_i / n_i + 1e-20) / mu)``.

    The objectives are the log-losses normalized by ``n`` (the average losses of the warm-up
    epoch, in the authors' code), with uniform preferences and no ideal point, and the result
    is multiplied by ``T``. By the chain rule,
    ``w_i = T softmax_i(f / mu) / (L_i + 1e-20 n_i)``, ``f_i = log(L_i / n_i + 1e-20)``.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` positive losses.
    normalizer : sequence of float or Tensor
        ``[T]`` positive normalizer ``n``.
    mu : float
        Smoothing ``mu > 0`` (the authors' default is 1).

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> from gradsurgery.functional import stch_log_weights
    >>> stch_log_weights([2.0, 2.0], [1.0, 1.0])
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    losses, normalizer = task_vectors(losses=losses, normalizer=normalizer)
    require_positive(losses, "STCH (log-transformed losses)")
    require_positive(normalizer, "STCH's normalizer")
    require_positive_number(mu, "mu")
    return float64(_stch_log_weights(losses, normalizer, mu))


def _preferences(
    values: list[float], preferences: FloatVector | None, ideal_point: FloatVector | None
) -> tuple[list[float], list[float]]:
    num_tasks = len(values)
    _, preferences, ideal_point = task_vectors(
        values=values, preferences=preferences, ideal_point=ideal_point
    )
    if preferences is not None and min(preferences) < 0:
        raise ValueError("preferences must be non-negative")
    return preferences or [1.0 / num_tasks] * num_tasks, ideal_point or [0.0] * num_tasks


def _softmax(scaled: list[float]) -> list[float]:
    top = max(scaled)  # the paper's Appendix B.1: exponents at most 0, no overflow
    exps = [math.exp(x - top) for x in scaled]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _stch_weights(
    values: list[float], mu: float, preferences: list[float], ideal_point: list[float]
) -> list[float]:
    scaled = [
        lam * (f - z) / mu for f, lam, z in zip(values, preferences, ideal_point, strict=True)
    ]
    return [lam * s for lam, s in zip(preferences, _softmax(scaled), strict=True)]


def _stch_log_weights(losses: list[float], normalizer: list[float], mu: float) -> list[float]:
    num_tasks = len(losses)
    ratios = [loss / n + LOG_EPSILON for loss, n in zip(losses, normalizer, strict=True)]
    soft = _softmax([math.log(r) / mu for r in ratios])
    # d/dL_i log(L_i / n_i + eps) = 1 / (n_i (L_i / n_i + eps))
    return [num_tasks * s / (n * r) for s, n, r in zip(soft, normalizer, ratios, strict=True)]


def log_loss_weights(losses: list[float]) -> list[float]:
    """The warm-up's weights: the gradient of ``sum_i log(L_i + 1e-20)``."""
    return [1.0 / (loss + LOG_EPSILON) for loss in losses]
