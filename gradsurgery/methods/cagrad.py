"""CAGrad (Liu et al. 2021): the best worst-task improvement near the mean gradient."""

from __future__ import annotations

import numpy as np

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._cagrad import CAGRAD_RESCALES, solve_cagrad

__all__ = ["CAGrad"]


class CAGrad(Method):
    """Conflict-averse gradient descent.

    See :func:`gradsurgery.functional.cagrad_weights`.

    Parameters
    ----------
    c : float
        Radius of the ball around the mean gradient, relative to its norm (``>= 0``; 0.4 as
        the authors' NYUv2 runs; ``0`` is the mean).
    rescale : {0, 1, 2}
        The official code's final scaling: none (torchjd), ``1 / (1 + c^2)`` (default),
        ``1 / (1 + c)``.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.cagrad import CAGrad
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 1.0]])
    >>> CAGrad(c=0.0).decide(stats).weights
    [0.5, 0.5]
    """

    needs = Needs.GRAMIAN
    # Task-specific parameters get each task's plain gradient, as in the reference code
    # (every loss back-propagated, only the shared gradient replaced).
    unshared = "sum"

    def __init__(self, c: float = 0.4, *, rescale: int = 1) -> None:
        self.c = check_number(c, "c")
        if rescale not in CAGRAD_RESCALES:
            raise ValueError(f"rescale must be one of {CAGRAD_RESCALES}, got {rescale!r}")
        self.rescale = rescale

    def decide(self, stats: TaskStats) -> Decision:
        G = np.array(stats.gramian_rows, dtype=np.float64)
        return Decision(weights=solve_cagrad(G, self.c, self.rescale))

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale})"
