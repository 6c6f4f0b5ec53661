"""DualProj (Lopez-Paz and Ranzato 2017, GEM): the mean projected onto the dual cone."""

from __future__ import annotations

from typing import Any

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._dualproj import dualproj_weights
from .upgrad import _check_length, _preferences

__all__ = ["DualProj"]


class DualProj(Method):
    """The closest direction to the (preference-weighted) mean that conflicts with no task.

    See :func:`gradsurgery.functional.dualproj_weights`.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` weights of the combination to project; the mean when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of the Gramian; ``0, 0`` (default) is the exact projection.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.dualproj import DualProj
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -2.0], [-2.0, 8.0]])
    >>> DualProj().decide(stats).weights
    [1.0, 0.5]
    """

    needs = Needs.GRAMIAN
    # Task-specific parameters get each task's plain gradient, as in the reference code
    # (every loss back-propagated, only the shared gradient replaced).
    unshared = "sum"

    def __init__(
        self, pref_vector: Any = None, *, norm_eps: float = 0.0, reg_eps: float = 0.0
    ) -> None:
        self.pref_vector = _preferences(pref_vector)
        self.norm_eps = check_number(norm_eps, "norm_eps")
        self.reg_eps = check_number(reg_eps, "reg_eps")

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        _check_length(self.pref_vector, num_tasks)

    def decide(self, stats: TaskStats) -> Decision:
        weights = dualproj_weights(
            stats.gramian, self.pref_vector, norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        return Decision(weights=weights.tolist())

    def __repr__(self) -> str:
        return (
            f"DualProj(pref_vector={self.pref_vector!r}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )
