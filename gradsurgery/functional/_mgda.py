"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._linalg import (
    _PYTHON_MAX_SIZE,
    as_gramian,
    as_task_vector,
    min_norm_simplex,
    min_norm_simplex_small,
)

__all__ = ["mgda_weights"]

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
MGDA_COMBINATIONS = ("raw", "normalized")


def mgda_weights(
    gramian: Tensor,
    losses: Sequence[float] | Tensor | None = None,
    *,
    normalization: str = "none",
    combine: str = "raw",
) -> Tensor:
    """MGDA's task weights (Désidéri 2012; Sener and Koltun 2018).

    The weights ``w`` on the simplex minimize ``||sum_i w_i g_i / n_i||^2``, the squared norm of
    a convex combination of the (normalized) task gradients. ``J^T w`` is then the
    minimum-norm point of their convex hull: a direction that lowers every loss when the
    gradients allow one, and zero at a Pareto-stationary point. The quadratic program is solved
    exactly, by an active-set method, not by Frank-Wolfe iterations.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian ``G = J J^T`` of the task gradients.
    losses : sequence of float or Tensor, optional
        The ``T`` loss values; needed by the ``"loss"`` and ``"loss+"`` normalizations.
    normalization : {"none", "l2", "loss", "loss+"}
        The normalizers ``n_i`` of Sener and Koltun's ``gradient_normalizers``: ``1``,
        ``||g_i||``, ``L_i``, or ``L_i ||g_i||``. A zero gradient keeps ``n_i = 1`` under
        ``"l2"`` and ``"loss+"`` (it stays zero instead of becoming NaN).
    combine : {"raw", "normalized"}
        What the weights multiply. ``"raw"`` (the authors' code): the solution ``w`` weights
        the original losses, so the update is ``sum_i w_i g_i``. ``"normalized"`` (LibMTL's
        convention): ``w_i / n_i``, so the update is the minimum-norm point of the normalized
        gradients. The two agree for ``normalization="none"``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights; on the simplex for ``combine="raw"``.

    Raises
    ------
    ValueError
        On a Gramian that is not one, an unknown option, missing losses, or a loss that is not
        positive under a loss normalization (dividing by it would flip or blow up a gradient).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import mgda_weights
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> mgda_weights(G)
    tensor([0.8000, 0.2000], dtype=torch.float64)
    >>> mgda_weights(G, normalization="l2")  # unit gradients: the bisector
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    if combine not in MGDA_COMBINATIONS:
        raise ValueError(f"combine must be one of {MGDA_COMBINATIONS}, got {combine!r}")
    return torch.from_numpy(np.array(solve_mgda(G, losses, normalization, combine)))


def solve_mgda(
    G: np.ndarray, losses: Sequence[float] | Tensor | None, normalization: str, combine: str
) -> list[float]:
    """:func:`mgda_weights` of a checked Gramian and ``combine``."""
    if normalization == "none":  # no normalizers: the weights of G itself
        if G.shape[0] <= _PYTHON_MAX_SIZE:
            return min_norm_simplex_small(G.tolist())
        return min_norm_simplex(G).tolist()
    normalizers = _normalizers(G, losses, normalization)
    weights = min_norm_simplex(G / np.outer(normalizers, normalizers))
    if combine == "normalized":
        weights = weights / normalizers
    return weights.tolist()


def _normalizers(
    G: np.ndarray, losses: Sequence[float] | Tensor | None, normalization: str
) -> np.ndarray:
    """Sener and Koltun's ``gradient_normalizers``, one float per task."""
    if normalization not in MGDA_NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {MGDA_NORMALIZATIONS}, got {normalization!r}"
        )
    num_tasks = G.shape[0]
    norms = np.sqrt(G.diagonal())
    norms = np.where(norms > 0, norms, 1.0)
    if normalization == "none":
        return np.ones(num_tasks)
    if normalization == "l2":
        return norms
    if losses is None:
        raise ValueError(f"normalization={normalization!r} divides by the losses: pass losses")
    loss_values = as_task_vector(losses, num_tasks, "losses")
    bad = np.flatnonzero(loss_values <= 0)
    if bad.size:
        raise ValueError(
            f"normalization={normalization!r} divides by the losses, but the loss of task(s) "
            f"{', '.join(map(str, bad))} is not positive; use 'none' or 'l2', or shift the "
            "losses by their lower bound"
        )
    return loss_values if normalization == "loss" else loss_values * norms
