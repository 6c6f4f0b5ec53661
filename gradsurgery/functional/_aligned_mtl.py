"""Aligned-MTL: the task gradients aligned by the Gramian's eigendecomposition."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._linalg import as_gramian, check_number, eigh, preference_weights

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
    return torch.from_numpy(solve_aligned_mtl(G, preferences, scale_mode, rtol))


def solve_aligned_mtl(
    G: np.ndarray, preferences: np.ndarray, scale_mode: str, rtol: float
) -> np.ndarray:
    """:func:`aligned_mtl_weights` of a checked Gramian and hyper-parameters."""
    num_tasks = G.shape[0]
    eigenvalues, eigenvectors = eigh(G)
    largest = float(eigenvalues.max())
    kept = eigenvalues > largest * num_tasks * rtol
    if largest <= 0 or not kept.any():  # every gradient is zero: nothing to align
        return preferences.copy()
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    if scale_mode == "min":
        scale = eigenvalues.min()
    elif scale_mode == "median":
        scale = _lower_median(eigenvalues)
    else:
        scale = eigenvalues.mean()
    # B p = sqrt(s) V (diag(lambda)^(-1/2) (V^T p)): two matrix-vector products, no B.
    return math.sqrt(scale) * (
        eigenvectors @ ((eigenvectors.T @ preferences) / np.sqrt(eigenvalues))
    )


def _lower_median(values: np.ndarray) -> float:
    """The lower of the two middle values for an even count, as ``torch.median``."""
    return float(np.sort(values)[(values.shape[0] - 1) // 2])
