"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._linalg import (
    _PYTHON_MAX_SIZE,
    as_gramian,
    check_number,
    normalize_and_regularize,
    preference_weights,
    project_dual_cone,
    project_dual_cone_small,
)

__all__ = ["dualproj_weights"]


def dualproj_weights(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> Tensor:
    """DualProj's task weights (Lopez-Paz and Ranzato 2017, GEM, eq. 11).

    The preference-weighted combination ``J^T p`` (the mean by default) is projected onto the
    dual cone ``{x : J x >= 0}`` of the task gradients: the closest direction to it that
    conflicts with no task. The projection is ``J^T v`` with
    ``v = argmin_{v >= p} v^T G v``, solved exactly by an active-set method.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T``.
    pref_vector : Tensor, optional
        ``[T]`` weights ``p`` of the combination to project; the mean, ``1 / T``, when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of ``G`` (see :func:`upgrad_weights`); ``0, 0`` (default) is the
        exact projection, torchjd's defaults are ``1e-4, 1e-4``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights ``v``; the update is ``J^T v``.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import dualproj_weights
    >>> G = torch.tensor([[1.0, -2.0], [-2.0, 8.0]], dtype=torch.float64)
    >>> w = dualproj_weights(G)
    >>> w
    tensor([1.0000, 0.5000], dtype=torch.float64)
    >>> G @ w  # the mean conflicted with task 0; the projection does not
    tensor([0., 2.], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    preferences = preference_weights(pref_vector, G.shape[0])
    norm_eps, reg_eps = check_number(norm_eps, "norm_eps"), check_number(reg_eps, "reg_eps")
    weights = solve_dualproj(G, preferences.tolist(), norm_eps, reg_eps)
    return torch.from_numpy(np.array(weights))


def solve_dualproj(
    G: np.ndarray, preferences: list[float], norm_eps: float, reg_eps: float
) -> list[float]:
    """:func:`dualproj_weights` of a checked Gramian and hyper-parameters."""
    G = normalize_and_regularize(G, norm_eps, reg_eps)
    if G.shape[0] <= _PYTHON_MAX_SIZE:
        return project_dual_cone_small(G.tolist(), [preferences])[0]
    return project_dual_cone(G, np.array(preferences)).tolist()
