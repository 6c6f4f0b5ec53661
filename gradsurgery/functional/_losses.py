"""Input checks shared by the loss weightings: loss vectors as Python floats, with the sign
each method's mathematics needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def task_vectors(**vectors: FloatVector | None) -> list[Any]:
    """Each vector :func:`as_floats` (``None`` stays ``None``), in order; all of the first's
    length, one value per task."""
    names = list(vectors)
    converted = [None if v is None else as_floats(v, name) for name, v in vectors.items()]
    for name, values in zip(names[1:], converted[1:], strict=True):
        if values is not None and len(values) != len(converted[0]):
            raise ValueError(
                f"{names[0]} and {name} must have one value per task, got "
                f"{len(converted[0])} and {len(values)}"
            )
    return converted


def require_positive_number(value: float, name: str) -> None:
    """Refuse a hyper-parameter that is not a finite number above zero."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def exp_weights(exponents: list[float], name: str, *, sign: float, scale: float) -> list[float]:
    """``scale * exp(sign * s_i)``: the weights of a learned log-parameter ``s`` (UW, IMTL-L),
    refused with the way out when they overflow."""
    try:
        return [scale * math.exp(sign * s) for s in exponents]
    except OverflowError:
        raise ValueError(
            f"the {name} have diverged (|s| up to {max(map(abs, exponents)):.6g}): the "
            "weights overflow; lower the learning rate of the optimizer that steps them"
        ) from None


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
