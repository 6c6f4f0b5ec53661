"""Checks shared by the functions that read a ``[T, T]`` Gramian and its hyper-parameters."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def gramian_array(gramian: Tensor) -> np.ndarray:
    """The Gramian as a float64 NumPy array, after checking that it is one.

    Raises a ``ValueError`` (``TypeError`` for a non-tensor or a non-float dtype) naming what
    is wrong: shape, a NaN or Inf, a negative diagonal (a squared norm cannot be negative).
    """
    if not isinstance(gramian, Tensor):
        raise TypeError(f"gramian must be a [T, T] tensor, got {type(gramian).__name__}")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] < 1:
        raise ValueError(
            f"gramian must be a square [T, T] tensor with T >= 1, got {tuple(gramian.shape)}"
        )
    if not gramian.is_floating_point():
        raise TypeError(f"gramian must have a float dtype, got {gramian.dtype}")
    array = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(array).all():
        raise ValueError("gramian holds NaN or Inf; check the task gradients it was computed from")
    if (array.diagonal() < 0).any():
        raise ValueError(
            "gramian has a negative diagonal entry, so it is not a Gramian G = J J^T "
            "(its diagonal holds the squared gradient norms)"
        )
    return array


def check_real(
    value: object, name: str, *, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    """``value`` as a float, refused unless finite and in ``[low, high]`` (``(low, high]`` when
    ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if low_open else "["
        upper = "inf)" if high == math.inf else f"{high}]"
        raise ValueError(f"{name} must be finite and in {bracket}{low}, {upper}, got {value}")
    return value


def check_count(value: object, name: str) -> int:
    """``value`` as a positive ``int``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
