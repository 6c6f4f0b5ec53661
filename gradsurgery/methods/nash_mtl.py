"""Nash-MTL (Navon et al. 2022): the tasks' Nash bargaining solution, warm-started."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._linalg import check_number, check_positive_int
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._nash_mtl import NashMTLNoSolutionError, clip_weights, solve_bargaining

__all__ = ["NashMTL"]


class NashMTL(Method):
    """The weights ``a`` with ``G a = 1 / a``, recomputed every ``update_weights_every`` steps.

    See :func:`gradsurgery.functional.nash_mtl_weights`. The state is the step count and the
    last bargaining weights (before clipping): they are reused between updates, as in the
    authors' code, and start the next solve (a warm start; the solution is unique, so it only
    saves Newton iterations).

    When the gradients are Pareto-stationary the bargaining equations have no solution; then, as
    the authors' code keeps its previous weights when its solver fails
    (github.com/AvivNavon/nash-mtl, ``methods/weight_methods.py``, ``NashMTL.solve_optimization``,
    commit cce1840), the last bargaining weights are reused (clipped with the current
    gradients) and the decision's extras say ``fallback=True``. Without previous weights (the
    first step, or after ``reset()``) the
    ``NashMTLNoSolutionError`` (a ``ValueError``) is raised.

    Parameters
    ----------
    max_norm : float
        Largest norm of the shared update ``J^T a``; ``0`` disables the clipping (default 1.0,
        the authors').
    update_weights_every : int
        Solve for new weights every this many steps (default 1).
    optim_niter : int
        Most Newton iterations per solve (default 20).

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.nash_mtl import NashMTL
    >>> method = NashMTL(max_norm=0.0)
    >>> decision = method.decide(TaskStats((1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 4.0]]))
    >>> [round(w, 6) for w in decision.weights]
    [1.0, 0.5]
    >>> method.commit(decision.state)
    >>> method.state_dict()["step"]
    1
    """

    needs = Needs.GRAMIAN

    def __init__(
        self, max_norm: float = 1.0, *, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        self.max_norm = check_number(max_norm, "max_norm")
        self.update_weights_every = check_positive_int(update_weights_every, "update_weights_every")
        self.optim_niter = check_positive_int(optim_niter, "optim_niter")
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.weights: tuple[float, ...] | None = None

    def decide(self, stats: TaskStats) -> Decision:
        G = np.array(stats.gramian_rows, dtype=np.float64)
        previous = None if self.weights is None else np.array(self.weights)
        if previous is not None and previous.shape[0] != G.shape[0]:
            raise ValueError(
                f"NashMTL kept weights for {previous.shape[0]} tasks but got {G.shape[0]}; "
                "call reset() when the number of tasks changes"
            )
        extras: dict[str, Any] = {"updated": False}
        if previous is None or self.step % self.update_weights_every == 0:
            try:
                solution = solve_bargaining(G, self.optim_niter, previous)
            except NashMTLNoSolutionError as error:
                if previous is None:
                    raise
                # No bargaining solution (Pareto-stationary gradients): keep the previous
                # weights, as the authors' solver does when it fails.
                bargained = previous
                extras = {"updated": False, "fallback": True, "reason": str(error)}
            else:
                bargained = solution.weights
                extras = {
                    "updated": True,
                    "fallback": False,
                    "converged": solution.converged,
                    "iterations": solution.iterations,
                }
        else:
            bargained = previous
        weights = clip_weights(G, bargained, self.max_norm)
        return Decision(
            weights=weights.tolist(),
            state=(self.step + 1, tuple(bargained.tolist())),
            extras=extras,
        )

    def commit(self, state: tuple[int, tuple[float, ...]]) -> None:
        self.step, self.weights = state

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "weights": None if self.weights is None else list(self.weights)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != {"step", "weights"}:
            raise ValueError(
                f"NashMTL's state has keys 'step' and 'weights', got {sorted(state_dict)}"
            )
        step, weights = state_dict["step"], state_dict["weights"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"NashMTL state 'step' must be an int >= 0, got {step!r}")
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError("NashMTL state 'weights' must be finite and non-negative")
        self.step, self.weights = step, weights

    def __repr__(self) -> str:
        return (
            f"NashMTL(max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter})"
        )
