"""What UPGrad and DualProj share: a preference vector, torchjd's conditioning of the Gramian,
and weights from a projection onto the dual cone of the task gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats


class DualConeMethod(Method):
    """A method whose weights are ``solver(G, preferences, norm_eps, reg_eps)``.

    A subclass names its solver in :attr:`solver`: the function behind its
    ``gradsurgery.functional`` counterpart, on a NumPy Gramian and a list of preferences,
    without the public function's checks (the pipeline checked the Gramian, ``__init__`` the
    rest).
    """

    solver: ClassVar[Callable[[np.ndarray, list[float], float, float], list[float]]]
    needs = Needs.GRAMIAN
    # Task-specific parameters get each task's plain gradient, as in the reference code
    # (every loss back-propagated, only the shared gradient replaced).
    unshared = "sum"

    def __init__(
        self, pref_vector: Any = None, *, norm_eps: float = 0.0, reg_eps: float = 0.0
    ) -> None:
        self.pref_vector = preferences(pref_vector)
        self.norm_eps = check_number(norm_eps, "norm_eps")
        self.reg_eps = check_number(reg_eps, "reg_eps")

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        check_length(self.pref_vector, num_tasks)

    def decide(self, stats: TaskStats) -> Decision:
        G = np.array(stats.gramian_rows, dtype=np.float64)
        num_tasks = G.shape[0]
        if self.pref_vector is None:
            preferences = [1.0 / num_tasks] * num_tasks
        else:
            check_length(self.pref_vector, num_tasks)
            preferences = list(self.pref_vector)
        solve = type(self).solver
        return Decision(weights=solve(G, preferences, self.norm_eps, self.reg_eps))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pref_vector={self.pref_vector!r}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


def preferences(pref_vector: Any) -> tuple[float, ...] | None:
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


def check_length(pref_vector: tuple[float, ...] | None, num_tasks: int) -> None:
    if pref_vector is not None and len(pref_vector) != num_tasks:
        raise ValueError(
            f"pref_vector has {len(pref_vector)} entries but there are {num_tasks} tasks"
        )
