"""Geometric loss strategy (Chennupati et al. 2019)."""

from __future__ import annotations

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._gls import _gls_weights
from ..functional._losses import require_positive

__all__ = ["GLS"]


class GLS(Method):
    """Descend the geometric mean of the losses, ``(prod_i L_i)^(1/T)``.

    The weights are its gradient, ``w_i = GM / (T L_i)`` (see
    :func:`~gradsurgery.functional.gls_weights`): every task is weighted by the inverse of its
    loss, so relative, not absolute, progress counts. The losses must be positive.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.gls import GLS
    >>> GLS().decide(TaskStats(losses=(1.0, 4.0))).weights
    [1.0, 0.25]
    """

    needs = Needs.LOSSES

    def decide(self, stats: TaskStats) -> Decision:
        require_positive(stats.losses, "GLS (the geometric mean's gradient)")
        return Decision(weights=_gls_weights(list(stats.losses)))
