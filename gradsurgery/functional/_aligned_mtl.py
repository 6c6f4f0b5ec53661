"""Aligned-MTL: the task gradients aligned by the Gramian's eigendecomposition."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

from .._linalg import _PYTHON_MAX_SIZE, as_gramian, check_number, eigh, preference_weights

__all__ = ["aligned_mtl_weights"]

ALIGNED_MTL_SCALE_MODES = ("min", "median", "rmse")
# The authors compute the Gramian's eigenvalues in float32 and treat those below
# T * eps(float32) * the largest as zero; the same cut-off here, in float64.
_AUTHORS_RTOL = float(np.finfo(np.float32).eps)


def aligned_mtl_weights(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    *,
    scale_mode: str = "min",
    rtol: float | None = None,
) -> Tensor:
    """Aligned-MTL's task weights (Senushkin et al. 2023, *Independent Component Alignment for
    Multi-Task Learning*).

    With the eigendecomposition ``G = V diag(lambda) V^T`` restricted to its rank ``r``, the
    balance transformation ``B = sqrt(s) V diag(lambda)^(-1/2) V^T`` makes the aligned
    gradients ``J^T B`` orthogonal with equal norms ``sqrt(s)``; the weights are ``B p``.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.
    pref_vector : Tensor, optional
        ``[T]`` preferences ``p``. ``None``: all ones, the authors' ``B.sum(0)`` (torchjd's
        default is the mean, ``1 / T``: ``T`` times smaller weights).
    scale_mode : {"min", "median", "rmse"}
        The common norm ``s``: the smallest eigenvalue (the authors' code), the median, or the
        mean.
    rtol : float, optional
        Eigenvalues at or below ``rtol * T * max(lambda)`` count as zero. ``None``: the
        authors' ``eps(float32)``; torchjd uses ``eps`` of the Gramian's dtype.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights; ``p`` itself when every gradient is zero.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import aligned_mtl_weights
    >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # orthogonal, norms 2 and 1
    >>> aligned_mtl_weights(G)  # both rescaled to the smaller norm
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    num_tasks = G.shape[0]
    preferences = (
        np.ones(num_tasks) if pref_vector is None else preference_weights(pref_vector, num_tasks)
    )
    if scale_mode not in ALIGNED_MTL_SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {ALIGNED_MTL_SCALE_MODES}, got {scale_mode!r}")
    rtol = _AUTHORS_RTOL if rtol is None else check_number(rtol, "rtol")
    weights = solve_aligned_mtl(G, preferences.tolist(), scale_mode, rtol)
    return torch.from_numpy(np.array(weights))


def solve_aligned_mtl(
    G: np.ndarray, preferences: list[float], scale_mode: str, rtol: float
) -> list[float]:
    """:func:`aligned_mtl_weights` of a checked Gramian and hyper-parameters, on Python floats
    after the eigendecomposition (a few NumPy calls on ``T`` values cost more than the
    arithmetic)."""
    num_tasks = G.shape[0]
    values, vectors = eigh(G)
    if num_tasks > _PYTHON_MAX_SIZE:
        return _balanced_numpy(values, vectors, np.array(preferences), scale_mode, rtol).tolist()
    eigenvalues, columns = values.tolist(), vectors.T.tolist()
    largest = max(eigenvalues)
    kept = [k for k, value in enumerate(eigenvalues) if value > largest * num_tasks * rtol]
    if largest <= 0 or not kept:  # every gradient is zero: nothing to align
        return list(preferences)
    kept_values = [eigenvalues[k] for k in kept]
    if scale_mode == "min":
        scale = min(kept_values)
    elif scale_mode == "median":
        scale = sorted(kept_values)[(len(kept_values) - 1) // 2]  # the lower one, as torch's
    else:
        scale = sum(kept_values) / len(kept_values)
    # B p = sqrt(s) V (diag(lambda)^(-1/2) (V^T p)): two matrix-vector products, no B.
    root = math.sqrt(scale)
    weights = [0.0] * num_tasks
    for k, value in zip(kept, kept_values, strict=True):
        column = columns[k]
        coefficient = root * sum(map(operator.mul, column, preferences)) / math.sqrt(value)
        for i in range(num_tasks):
            weights[i] += coefficient * column[i]
    return weights


def _balanced_numpy(
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    preferences: np.ndarray,
    scale_mode: str,
    rtol: float,
) -> np.ndarray:
    """:func:`solve_aligned_mtl` after the eigendecomposition, on NumPy (many tasks)."""
    largest = float(eigenvalues.max())
    kept = eigenvalues > largest * eigenvalues.shape[0] * rtol
    if largest <= 0 or not kept.any():
        return preferences.copy()
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    if scale_mode == "min":
        scale = float(eigenvalues.min())
    elif scale_mode == "median":
        scale = float(np.sort(eigenvalues)[(eigenvalues.shape[0] - 1) // 2])
    else:
        scale = float(eigenvalues.mean())
    aligned = (eigenvectors.T @ preferences) / np.sqrt(eigenvalues)
    return math.sqrt(scale) * (eigenvectors @ aligned)
