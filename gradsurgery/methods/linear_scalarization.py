"""Fixed task weights: the linear scalarization every comparison starts from."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._weighting import Decision, Method, Needs, TaskStats

__all__ = ["LinearScalarization"]


class LinearScalarization(Method):
    """Descend ``sum_i weights[i] * L_i`` with fixed weights.

    The tuned baseline of every multi-task comparison. It needs the loss values only, so a
    step is one backward pass of the weighted sum.

    Parameters
    ----------
    weights : sequence of float
        One finite weight per task (any sign; ``[1.0] * T`` is the plain sum).

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.linear_scalarization import LinearScalarization
    >>> LinearScalarization([1.0, 0.5]).decide(TaskStats(losses=(2.0, 4.0))).weights
    (1.0, 0.5)
    """

    needs = Needs.LOSSES

    def __init__(self, weights: Sequence[float]) -> None:
        try:
            values = tuple(float(w) for w in weights)
        except (TypeError, ValueError) as error:
            raise TypeError(f"weights must be a sequence of numbers, got {weights!r}") from error
        if not values:
            raise ValueError("weights is empty: expected one weight per task")
        if not all(math.isfinite(w) for w in values):
            raise ValueError(f"weights must be finite, got {values}")
        self.weights = values

    def check_num_tasks(self, num_tasks: int) -> None:
        if num_tasks != len(self.weights):
            raise ValueError(
                f"LinearScalarization has {len(self.weights)} weights, got {num_tasks} losses"
            )

    def decide(self, stats: TaskStats) -> Decision:
        return Decision(weights=self.weights)

    def __repr__(self) -> str:
        return f"LinearScalarization(weights={list(self.weights)})"
