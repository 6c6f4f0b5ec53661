"""UPGrad (Quinton and Rey 2024): every task gradient projected onto the dual cone."""

from __future__ import annotations

from typing import Any

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._upgrad import upgrad_weights

__all__ = ["UPGrad"]


class UPGrad(Method):
    """The sum of the task gradients' projections onto the dual cone of all of them.

    See :func:`gradsurgery.functional.upgrad_weights`.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` preferences; the mean (``1 / T``) when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of the Gramian; ``0, 0`` (default) is the exact projection.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.upgrad import UPGrad
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -1.0], [-1.0, 4.0]])
    >>> UPGrad().decide(stats).weights
    [1.0, 0.625]
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
        weights = upgrad_weights(
            stats.gramian, self.pref_vector, norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        return Decision(weights=weights.tolist())

    def __repr__(self) -> str:
        return (
            f"UPGrad(pref_vector={self.pref_vector!r}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


def _preferences(pref_vector: Any) -> tuple[float, ...] | None:
    """A preference vector as a tuple of finite floats (``None`` stays ``None``)."""
    if pref_vector is None:
        return None
    if hasattr(pref_vector, "tolist"):
        pref_vector = pref_vector.tolist()
    try:
        values = tuple(float(value) for value in pref_vector)
    except (TypeError, ValueError):
        raise TypeError("pref_vector must be a sequence of numbers or a 1-D tensor") from None
    if not values or any(value != value or abs(value) == float("inf") for value in values):
        raise ValueError(f"pref_vector must be non-empty and finite, got {values}")
    return values


def _check_length(pref_vector: tuple[float, ...] | None, num_tasks: int) -> None:
    if pref_vector is not None and len(pref_vector) != num_tasks:
        raise ValueError(
            f"pref_vector has {len(pref_vector)} entries but there are {num_tasks} tasks"
        )
