"""FAMO, fast adaptive multitask optimization (Liu, Feng, Stone & Liu 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._famo import (
    _check_bounds,
    _famo_weights,
    _logit_gradient,
    _softmax,
    adam_step,
)
from ..functional._losses import as_floats

__all__ = ["FAMO"]

_UPDATES = ("next_losses", "manual")


class FAMO(Method):
    """FAMO: learned task logits that make every loss fall at the same relative rate.

    The model descends ``c^-1 sum_i z_i log(L_i - b_i + eps)`` with ``z = softmax(logits)``
    (weights :func:`~gradsurgery.functional.famo_weights`, summing to one). The logits have an
    Adam of their own (``w_lr``, L2 weight decay ``gamma``), stepped along
    :func:`~gradsurgery.functional.famo_logit_gradient` of how much each log-loss fell across a
    model step.

    Parameters
    ----------
    num_tasks : int
        ``T``.
    w_lr : float
        The logits' learning rate (default 0.025, the authors').
    gamma : float
        The logits' weight decay (default 1e-3: the authors' NYUv2 script, LibMTL and torchjd;
        the authors' ``weight_methods.py`` default is 1e-5).
    min_losses : sequence of float, optional
        Lower bounds ``b`` of the losses (zeros when ``None``); a loss below its bound is refused.
    update : {"next_losses", "manual"}
        Which losses measure the fall. ``"next_losses"`` (default, no extra forward pass): the
        next step's losses, on the next batch, at the start of the next step.
        ``"manual"`` (the authors' experiments): after ``optimizer.step()``, recompute the losses
        on the *same* batch under ``torch.no_grad()`` (one extra forward pass) and call
        :meth:`update` with them (through the wrapper: ``opt.method.update(losses)``, with
        ``opt = gs.FAMO(optimizer, num_tasks=T, update="manual")``).

    Notes
    -----
    The authors' code also clips the shared parameters' gradient norm to 1; clip it in your loop
    if you want that too.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.famo import FAMO
    >>> method = FAMO(2)
    >>> [round(w, 6) for w in method.decide(TaskStats(losses=(1.0, 3.0))).weights]
    [0.75, 0.25]
    """

    needs = Needs.LOSSES

    def __init__(
        self,
        num_tasks: int,
        *,
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | Tensor | None = None,
        update: str = "next_losses",
    ) -> None:
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        for name, value in (("w_lr", w_lr), ("gamma", gamma)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if update not in _UPDATES:
            raise ValueError(f"update must be one of {_UPDATES}, got {update!r}")
        if min_losses is None:
            min_losses = [0.0] * num_tasks
        else:
            min_losses = as_floats(min_losses, "min_losses")
            if len(min_losses) != num_tasks:
                raise ValueError(f"min_losses must have {num_tasks} values, got {len(min_losses)}")
        self.num_tasks = num_tasks
        self.w_lr, self.gamma, self.update_mode = float(w_lr), float(gamma), update
        self.min_losses = min_losses
        self.reset()

    def reset(self) -> None:
        self.logits = [0.0] * self.num_tasks
        self._adam: tuple[int, list[float], list[float]] = (
            0,
            [0.0] * self.num_tasks,
            [0.0] * self.num_tasks,
        )
        self._previous_losses: list[float] | None = None

    @property
    def weights(self) -> list[float]:
        """The task weights ``z = softmax(logits)`` (before the ``1 / (c D_i)`` rescaling)."""
        return _softmax(self.logits)

    def check_num_tasks(self, num_tasks: int) -> None:
        if num_tasks != self.num_tasks:
            raise ValueError(f"FAMO was built for {self.num_tasks} tasks, got {num_tasks} losses")

    def decide(self, stats: TaskStats) -> Decision:
        losses = list(stats.losses)
        _check_bounds(losses, self.min_losses)
        logits, adam = self.logits, self._adam
        if self.update_mode == "next_losses" and self._previous_losses is not None:
            logits, adam = self._step_logits(self._previous_losses, losses)
        weights = _famo_weights(losses, _softmax(logits), self.min_losses)
        return Decision(weights=weights, state=(logits, adam, losses))

    def commit(self, state: Any) -> None:
        self.logits, self._adam, self._previous_losses = state

    def update(self, losses: Sequence[float] | Tensor) -> None:
        """Step the logits from the losses recomputed on the same batch after the model step.

        For ``update="manual"``: call it after ``optimizer.step()`` with the losses of one extra
        forward pass on the batch of the last step (under ``torch.no_grad()``).
        """
        if self.update_mode != "manual":
            raise RuntimeError(
                "FAMO(update='next_losses') steps its logits from the next step's losses; "
                "build it with update='manual' to call update() yourself"
            )
        if self._previous_losses is None:
            raise RuntimeError("update() needs a step first: it compares its losses to the step's")
        losses = as_floats(losses, "losses")
        self.check_num_tasks(len(losses))
        _check_bounds(losses, self.min_losses)
        self.logits, self._adam = self._step_logits(self._previous_losses, losses)

    def _step_logits(
        self, before: list[float], after: list[float]
    ) -> tuple[list[float], tuple[int, list[float], list[float]]]:
        gradient = _logit_gradient(_softmax(self.logits), before, after, self.min_losses)
        return adam_step(self.logits, gradient, self._adam, lr=self.w_lr, weight_decay=self.gamma)

    def state_dict(self) -> dict[str, Any]:
        step, exp_avg, exp_avg_sq = self._adam
        return {
            "logits": list(self.logits),
            "step": step,
            "exp_avg": list(exp_avg),
            "exp_avg_sq": list(exp_avg_sq),
            "previous_losses": None
            if self._previous_losses is None
            else list(self._previous_losses),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        expected = {"logits", "step", "exp_avg", "exp_avg_sq", "previous_losses"}
        if set(state_dict) != expected:
            raise ValueError(
                f"not a FAMO state: expected keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        vectors = [as_floats(state_dict[k], k) for k in ("logits", "exp_avg", "exp_avg_sq")]
        previous = state_dict["previous_losses"]
        if previous is not None:
            vectors.append(previous := as_floats(previous, "previous_losses"))
        step = state_dict["step"]
        if any(len(v) != self.num_tasks for v in vectors):
            raise ValueError(
                f"not a state of this FAMO: its vectors must have {self.num_tasks} values"
            )
        if not isinstance(step, int) or step < 0 or min(vectors[2]) < 0:
            raise ValueError("not a FAMO state: a negative step count or second moment")
        self.logits = vectors[0]
        self._adam = (step, vectors[1], vectors[2])
        self._previous_losses = previous

    def __repr__(self) -> str:
        return (
            f"FAMO(num_tasks={self.num_tasks}, w_lr={self.w_lr}, gamma={self.gamma}, "
            f"update={self.update_mode!r})"
        )
