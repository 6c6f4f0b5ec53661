"""MGDA (Désidéri 2012; Sener and Koltun 2018): the minimum-norm convex combination."""

from __future__ import annotations

import numpy as np

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._mgda import MGDA_COMBINATIONS, MGDA_NORMALIZATIONS, solve_mgda

__all__ = ["MGDA"]


class MGDA(Method):
    """Weights on the simplex whose combination of the task gradients has the least norm.

    See :func:`gradsurgery.functional.mgda_weights` for the mathematics and the options.

    Parameters
    ----------
    normalization : {"none", "l2", "loss", "loss+"}
        Sener and Koltun's gradient normalization before the min-norm problem.
    combine : {"raw", "normalized"}
        Whether the weights multiply the original losses (the authors' code) or the normalized
        gradients (LibMTL).

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.mgda import MGDA
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 4.0]])
    >>> [round(w, 6) for w in MGDA().decide(stats).weights]
    [0.8, 0.2]
    """

    needs = Needs.GRAMIAN

    def __init__(self, normalization: str = "none", combine: str = "raw") -> None:
        if normalization not in MGDA_NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {MGDA_NORMALIZATIONS}, got {normalization!r}"
            )
        if combine not in MGDA_COMBINATIONS:
            raise ValueError(f"combine must be one of {MGDA_COMBINATIONS}, got {combine!r}")
        self.normalization = normalization
        self.combine = combine

    def decide(self, stats: TaskStats) -> Decision:
        G = np.array(stats.gramian_rows, dtype=np.float64)
        return Decision(weights=solve_mgda(G, stats.losses, self.normalization, self.combine))

    def __repr__(self) -> str:
        return f"MGDA(normalization={self.normalization!r}, combine={self.combine!r})"
