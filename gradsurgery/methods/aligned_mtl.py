"""Aligned-MTL (Senushkin et al. 2023): gradients aligned by the Gramian's eigenvectors."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._aligned_mtl import _AUTHORS_RTOL, ALIGNED_MTL_SCALE_MODES, solve_aligned_mtl
from ._dual_cone import check_length, preferences

__all__ = ["AlignedMTL"]


class AlignedMTL(Method):
    """Task weights that make the aligned gradients orthogonal with equal norms.

    See :func:`gradsurgery.functional.aligned_mtl_weights`.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` preferences; all ones (the authors' code) when ``None``.
    scale_mode : {"min", "median", "rmse"}
        The common norm of the aligned gradients.
    rtol : float, optional
        Relative cut-off of the Gramian's eigenvalues (``None``: the authors' float32 one).

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.aligned_mtl import AlignedMTL
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[4.0, 0.0], [0.0, 1.0]])
    >>> AlignedMTL().decide(stats).weights
    [0.5, 1.0]
    """

    needs = Needs.GRAMIAN
    # Task-specific parameters get each task's plain gradient, as in the reference code
    # (every loss back-propagated, only the shared gradient replaced).
    unshared = "sum"

    def __init__(
        self, pref_vector: Any = None, *, scale_mode: str = "min", rtol: float | None = None
    ) -> None:
        self.pref_vector = preferences(pref_vector)
        if scale_mode not in ALIGNED_MTL_SCALE_MODES:
            raise ValueError(
                f"scale_mode must be one of {ALIGNED_MTL_SCALE_MODES}, got {scale_mode!r}"
            )
        self.scale_mode = scale_mode
        self.rtol = None if rtol is None else check_number(rtol, "rtol")

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        check_length(self.pref_vector, num_tasks)

    def decide(self, stats: TaskStats) -> Decision:
        G = np.array(stats.gramian_rows, dtype=np.float64)
        num_tasks = G.shape[0]
        check_length(self.pref_vector, num_tasks)
        preferences = [1.0] * num_tasks if self.pref_vector is None else list(self.pref_vector)
        rtol = _AUTHORS_RTOL if self.rtol is None else self.rtol
        return Decision(weights=solve_aligned_mtl(G, preferences, self.scale_mode, rtol))

    def __repr__(self) -> str:
        return (
            f"AlignedMTL(pref_vector={self.pref_vector!r}, scale_mode={self.scale_mode!r}, "
            f"rtol={self.rtol})"
        )
