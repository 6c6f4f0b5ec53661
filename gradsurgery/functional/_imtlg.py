"""IMTL-G: the combination whose projections on every unit task gradient are equal."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._linalg import as_gramian, pinv_psd, scale_of

__all__ = ["imtlg_weights"]


def imtlg_weights(gramian: Tensor) -> Tensor:
    """IMTL-G's task weights (Liu et al. 2021, *Towards Impartial Multi-task Learning*).

    The weights ``w`` sum to one and make ``d = J^T w`` project equally onto every unit task
    gradient: ``d . g_i / ||g_i||`` is the same for all ``i``. That is ``G w = c n`` with
    ``n_i = ||g_i||``, so ``w`` is ``G^+ n`` scaled to sum to one; the pseudo-inverse extends
    the method to linearly dependent gradients (Quinton and Rey 2024), as torchjd does
    (eigenvalues below ``T`` machine epsilons of the largest count as zero).

    Returns zero weights (no update) when ``G^+ n`` sums to zero relative to its size: all
    gradients zero, or no combination projects equally and positively (an exactly opposed
    pair).

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights summing to one (or zeros, as above).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import imtlg_weights
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # orthogonal, norms 1 and 2
    >>> w = imtlg_weights(G)
    >>> w
    tensor([0.6667, 0.3333], dtype=torch.float64)
    >>> (G @ w) / G.diagonal().sqrt()  # equal projections
    tensor([0.6667, 0.6667], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    num_tasks = G.shape[0]
    scale = scale_of(G)
    if scale == 0.0:
        return torch.zeros(num_tasks, dtype=torch.float64)
    # Weights do not change when G is scaled; a unit scale makes the zero-sum test relative.
    G = G / scale
    norms = np.sqrt(G.diagonal())
    solution = pinv_psd(G, num_tasks * np.finfo(np.float64).eps) @ norms
    total = float(solution.sum())
    if abs(total) < 1e-12 * max(1.0, float(np.abs(solution).max())):
        return torch.zeros(num_tasks, dtype=torch.float64)
    return torch.from_numpy(solution / total)
