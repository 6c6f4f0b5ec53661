"""UPGrad: every task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._linalg import (
    _PYTHON_MAX_SIZE,
    as_gramian,
    check_number,
    nnls_gram_small,
    normalize_and_regularize,
    preference_weights,
    project_dual_cone,
)

__all__ = ["upgrad_weights"]


def upgrad_weights(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> Tensor:
    """UPGrad's task weights (Quinton and Rey 2024, *Jacobian Descent for Multi-Objective
    Optimization*).

    Each task gradient, scaled by its preference ``p_i``, is projected onto the dual cone
    ``{x : J x >= 0}`` of all task gradients, and the projections are summed:
    ``d = sum_i pi_J(p_i g_i) = J^T w``. The result conflicts with no task (``J d >= 0``).
    Each projection is the quadratic program ``v = argmin_{v >= p_i e_i} v^T G v``
    (Proposition 1 of the paper), solved exactly by an active-set method.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.
    pref_vector : Tensor, optional
        ``[T]`` preferences ``p``; the mean, ``1 / T``, when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of ``G`` before the projection: ``G / trace(G) + reg_eps I``,
        with ``G`` taken as zero when its trace is below ``norm_eps``. The default ``0, 0`` is
        the exact projection of the paper; torchjd's defaults are ``1e-4, 1e-4``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights ``w``; the update is ``J^T w``.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import upgrad_weights
    >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64)  # conflicting gradients
    >>> w = upgrad_weights(G)
    >>> w
    tensor([1.0000, 0.6250], dtype=torch.float64)
    >>> G @ w  # J (J^T w): no task is hurt
    tensor([0.3750, 1.5000], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    preferences = preference_weights(pref_vector, G.shape[0])
    norm_eps, reg_eps = check_number(norm_eps, "norm_eps"), check_number(reg_eps, "reg_eps")
    weights = solve_upgrad(G, preferences.tolist(), norm_eps, reg_eps)
    return torch.from_numpy(np.array(weights))


def solve_upgrad(
    G: np.ndarray, preferences: list[float], norm_eps: float, reg_eps: float
) -> list[float]:
    """:func:`upgrad_weights` of a checked Gramian and hyper-parameters."""
    G = normalize_and_regularize(G, norm_eps, reg_eps)
    num_tasks = G.shape[0]
    if num_tasks <= _PYTHON_MAX_SIZE:
        return _solve_upgrad_small(G.tolist(), preferences)
    return project_dual_cone(G, np.diag(preferences)).sum(axis=0).tolist()


def _solve_upgrad_small(G: list[list[float]], preferences: list[float]) -> list[float]:
    """:func:`solve_upgrad` on Python floats: ``p + sum_i z_i`` for the projections
    ``p_i e_i + z_i`` (``project_dual_cone_small`` with each target ``-p_i G e_i`` read off a
    column, and one scaling of ``G`` for all of them)."""
    num_tasks = len(G)
    scale = max([G[i][i] for i in range(num_tasks)])
    weights = [float(preference) for preference in preferences]
    if scale == 0.0:  # every gradient is zero: each p_i e_i is its own projection
        return weights
    matrix = [[value / scale for value in row] for row in G]
    magnitude = max([max(map(abs, row)) for row in matrix])
    for i, preference in enumerate(preferences):
        z = nnls_gram_small(matrix, [-preference * row[i] for row in matrix], magnitude)
        weights = [weight + z_j for weight, z_j in zip(weights, z, strict=True)]
    return weights
