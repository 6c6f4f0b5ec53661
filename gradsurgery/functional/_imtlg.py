"""IMTL-G: the combination whose projections on every unit task gradient are equal."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._linalg import _PYTHON_MAX_SIZE, as_gramian, ldl_factor, ldl_solve, pinv_psd, scale_of

__all__ = ["imtlg_weights"]

_EPS = float(np.finfo(np.float64).eps)


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
    return torch.from_numpy(np.array(solve_imtlg(as_gramian(gramian))))


def solve_imtlg(G: np.ndarray) -> list[float]:
    """:func:`imtlg_weights` of a checked Gramian."""
    num_tasks = G.shape[0]
    scale = scale_of(G)
    if scale == 0.0:
        return [0.0] * num_tasks
    # Weights do not change when G is scaled; a unit scale makes the zero-sum test relative.
    G = G / scale
    rtol = num_tasks * _EPS
    solution = _inverse_times_norms(G.tolist(), rtol) if num_tasks <= _PYTHON_MAX_SIZE else None
    if solution is None:
        solution = (pinv_psd(G, rtol) @ np.sqrt(G.diagonal())).tolist()
    total = sum(solution)
    if abs(total) < 1e-12 * max(1.0, max(map(abs, solution))):
        return [0.0] * num_tasks
    return [value / total for value in solution]


def _inverse_times_norms(G: list[list[float]], rtol: float) -> list[float] | None:
    """``G^-1 n`` on Python floats when ``G`` provably has no eigenvalue at or below
    ``rtol * lambda_max`` (so that ``G^+ = G^-1``), else ``None``.

    The proof: ``lambda_min >= det(G) / lambda_max^(T-1)`` and ``lambda_max <= trace(G)``, so
    ``det(G) > rtol trace(G)^T`` puts every eigenvalue above the cut-off; the determinant is
    the product of the ``L D L^T`` pivots. A factor of 10 keeps rounding out of the test.
    """
    num_tasks = len(G)
    indices = list(range(num_tasks))
    factors = ldl_factor(G, indices, 0.0)
    if factors is None:
        return None
    lower, pivots = factors
    trace = sum(G[i][i] for i in indices)
    if math.prod(pivots) <= 10.0 * rtol * trace**num_tasks:
        return None
    return ldl_solve(lower, pivots, [math.sqrt(G[i][i]) for i in indices])
