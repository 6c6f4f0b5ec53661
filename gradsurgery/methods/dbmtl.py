"""DB-MTL, dual-balancing multi-task learning (Lin et al. 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._dbmtl import _dbmtl_weights, check_betas
from ..functional._losses import as_floats, require_positive

__all__ = ["DBMTL"]


class DBMTL(Method):
    """DB-MTL: log-transformed losses, their gradients rescaled to the largest averaged norm.

    Each task descends ``log L_i``; the norms of those gradients, ``||g_i|| / L_i``, are
    averaged over steps, and every task's gradient is rescaled to the largest average norm (see
    :func:`~gradsurgery.functional.dbmtl_weights`). It reads the task gradients' norms on the
    shared parameters (``Needs.NORMS``), so a step costs the per-task norms but no Gramian.

    Parameters
    ----------
    beta : float
        Decay of the norm average, in ``[0, 1)`` (default 0.9, the authors').
    beta_sigma : float
        The decay at step ``t`` is ``beta / t^beta_sigma`` (default 0, the authors').

    Notes
    -----
    The authors' code averages the gradient vectors and combines the averages; this method
    averages the norms and combines the current gradients (``T`` numbers of state, not
    ``T x P``). Both give the same update as long as no task's gradient changes direction from
    step to step, and at every step with ``beta=0``. Task-specific parameters get the same
    weights here, the plain log-loss gradient in the authors' code.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.dbmtl import DBMTL
    >>> decision = DBMTL(beta=0.0).decide(TaskStats(losses=(1.0, 2.0), squared_norms=(16.0, 1.0)))
    >>> [round(w, 6) for w in decision.weights]
    [1.0, 4.0]
    """

    needs = Needs.NORMS

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        check_betas(beta, beta_sigma)
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self._norm_average: list[float] | None = None

    def decide(self, stats: TaskStats) -> Decision:
        losses = list(stats.losses)
        require_positive(losses, "DB-MTL (log-transformed losses)")
        average = self._norm_average
        if average is None:
            average = [0.0] * len(losses)
        elif len(average) != len(losses):
            raise ValueError(
                f"DB-MTL saw {len(average)} tasks so far, got {len(losses)} losses; call "
                "reset() before changing the number of tasks"
            )
        step = self._step + 1
        weights, average = _dbmtl_weights(
            losses, list(stats.grad_norms), average, step, self.beta, self.beta_sigma
        )
        return Decision(weights=weights, state=(step, average))

    def commit(self, state: Any) -> None:
        self._step, self._norm_average = state

    def state_dict(self) -> dict[str, Any]:
        average = None if self._norm_average is None else list(self._norm_average)
        return {"step": self._step, "norm_average": average}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != {"step", "norm_average"}:
            raise ValueError(
                f"not a DBMTL state: expected keys ['norm_average', 'step'], got "
                f"{sorted(state_dict)}"
            )
        step, average = state_dict["step"], state_dict["norm_average"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"not a DBMTL state: step must be an int >= 0, got {step!r}")
        if average is not None:
            average = as_floats(average, "norm_average")
            if min(average) < 0:
                raise ValueError("not a DBMTL state: a negative norm average")
        self._step, self._norm_average = step, average

    def __repr__(self) -> str:
        return f"DBMTL(beta={self.beta}, beta_sigma={self.beta_sigma})"
