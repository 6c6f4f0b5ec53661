"""IMTL-G (Liu et al. 2021): equal projections onto every unit task gradient."""

from __future__ import annotations

import numpy as np

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._imtlg import solve_imtlg

__all__ = ["IMTLG"]


class IMTLG(Method):
    """Weights summing to one whose combination projects equally on every task's direction.

    See :func:`gradsurgery.functional.imtlg_weights`.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.imtlg import IMTLG
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 4.0]])
    >>> [round(w, 6) for w in IMTLG().decide(stats).weights]
    [0.666667, 0.333333]
    """

    needs = Needs.GRAMIAN
    # Task-specific parameters get each task's plain gradient, as in the reference code
    # (every loss back-propagated, only the shared gradient replaced).
    unshared = "sum"

    def decide(self, stats: TaskStats) -> Decision:
        return Decision(weights=solve_imtlg(np.array(stats.gramian_rows, dtype=np.float64)))
