"""Input checks shared by the loss weightings: loss vectors as Python floats, with the sign
each method's mathematics needs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FloatVector = Sequence[float] | Tensor


def as_floats(values: FloatVector, name: str) -> list[float]:
    """``values`` (a sequence of numbers or a 1-D tensor) as a non-empty list of finite floats."""
    if isinstance(values, Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
        values = values.detach().to("cpu", torch.float64).tolist()
    else:
        values = [float(value) for value in values]
    if not values:
        raise ValueError(f"{name} is empty: expected one value per task")
    bad = [i for i, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{name} of task(s) {', '.join(map(str, bad))} is NaN or Inf")
    return values


def same_length(first: list[float], second: list[float], names: str) -> None:
    if len(first) != len(second):
        raise ValueError(
            f"{names} must have one value per task, got {len(first)} and {len(second)}"
        )


def require_positive(losses: Sequence[float], method: str, *, zero: bool = False) -> None:
    """Refuse losses below zero (``zero=True``) or at or below zero (``zero=False``).

    The message says why the method needs it and the way out: a loss with a known lower bound
    ``b`` can be passed as ``loss - b + eps``.
    """
    bad = [i for i, loss in enumerate(losses) if loss < 0 or (loss == 0 and not zero)]
    if bad:
        sign = "non-negative" if zero else "positive"
        values = ", ".join(f"{losses[i]:.6g}" for i in bad)
        raise ValueError(
            f"{method} needs {sign} losses, but the loss of task(s) "
            f"{', '.join(map(str, bad))} is {values}; pass a shifted loss (loss - lower_bound + "
            "eps) for a loss that can reach zero or go negative"
        )


def float64(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float64)
