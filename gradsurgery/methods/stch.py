"""Smooth Tchebycheff scalarization (Lin et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._losses import as_floats, require_positive, require_positive_number
from ..functional._stch import (
    _preferences,
    _stch_log_weights,
    _stch_weights,
    log_loss_weights,
)

__all__ = ["STCH"]


class STCH(Method):
    """Smooth Tchebycheff scalarization: a smooth maximum of the (log-)losses.

    ``log_transform=True`` (default, the authors' multi-task code): for ``warmup_epochs``
    epochs the model descends ``sum_i log L_i``; over the next epoch it does the same and
    averages the losses into a normalizer ``n``; from then on it descends
    ``T mu log sum_i exp(log(L_i / n_i) / mu)`` (weights
    :func:`~gradsurgery.functional.stch_log_weights`). Call :meth:`end_epoch` at the end of
    every epoch (through the wrapper: ``opt.method.end_epoch()``, with
    ``opt = gs.STCH(optimizer)``). The losses must be positive.

    ``log_transform=False`` (the paper's eq. 8, torchjd's ``STCH``): the model descends
    ``mu log sum_i exp(lambda_i (L_i - z_i) / mu)`` from the first step (weights
    :func:`~gradsurgery.functional.stch_weights`), with ``preferences`` ``lambda`` (``1/T``
    each by default) and ``ideal_point`` ``z`` (zeros by default); no warm-up.

    Parameters
    ----------
    mu : float
        Smoothing ``mu > 0`` (default 1, the authors'); smaller is closer to the maximum.
    warmup_epochs : int, optional
        Epochs of plain log-loss descent before the normalizer's epoch (default 4, the authors';
        only with ``log_transform=True``).
    log_transform : bool
        The authors' multi-task form (default) or the paper's plain form.
    preferences, ideal_point : sequence of float, optional
        ``lambda`` and ``z`` of the plain form.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.stch import STCH
    >>> STCH(mu=0.5, log_transform=False).decide(TaskStats(losses=(1.0, 1.0))).weights
    [0.25, 0.25]
    """

    needs = Needs.LOSSES

    def __init__(
        self,
        mu: float = 1.0,
        *,
        warmup_epochs: int | None = None,
        log_transform: bool = True,
        preferences: Sequence[float] | Tensor | None = None,
        ideal_point: Sequence[float] | Tensor | None = None,
    ) -> None:
        require_positive_number(mu, "mu")
        if log_transform:
            if preferences is not None or ideal_point is not None:
                raise ValueError(
                    "preferences and ideal_point belong to the plain form: pass "
                    "log_transform=False to use them"
                )
            warmup_epochs = 4 if warmup_epochs is None else warmup_epochs
            if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
                raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        elif warmup_epochs not in (None, 0):
            raise ValueError("the plain form (log_transform=False) has no warm-up")
        self.mu = float(mu)
        self.log_transform = bool(log_transform)
        self.warmup_epochs = warmup_epochs or 0
        self.preferences = None if preferences is None else as_floats(preferences, "preferences")
        self.ideal_point = None if ideal_point is None else as_floats(ideal_point, "ideal_point")
        self.reset()

    def reset(self) -> None:
        self._epoch = 0
        self._loss_sum: list[float] | None = None  # over the normalizer's epoch
        self._loss_count = 0
        self.normalizer: list[float] | None = None

    def decide(self, stats: TaskStats) -> Decision:
        losses = list(stats.losses)
        if not self.log_transform:
            preferences, ideal_point = _preferences(losses, self.preferences, self.ideal_point)
            return Decision(weights=_stch_weights(losses, self.mu, preferences, ideal_point))
        require_positive(losses, "STCH (log-transformed losses)")
        if self.normalizer is not None:
            if len(self.normalizer) != len(losses):
                raise ValueError(
                    f"STCH's normalizer has {len(self.normalizer)} tasks, got {len(losses)} "
                    "losses; call reset() before changing the number of tasks"
                )
            return Decision(weights=_stch_log_weights(losses, self.normalizer, self.mu))
        state = None
        if self._epoch == self.warmup_epochs:  # the normalizer's epoch: sum its losses
            if self._loss_sum is None:
                state = (losses, 1)
            elif len(self._loss_sum) != len(losses):
                raise ValueError("the number of losses changed within STCH's normalizer epoch")
            else:
                sums = [s + loss for s, loss in zip(self._loss_sum, losses, strict=True)]
                state = (sums, self._loss_count + 1)
        return Decision(weights=log_loss_weights(losses), state=state)

    def commit(self, state: Any) -> None:
        if state is not None:
            self._loss_sum, self._loss_count = state

    def end_epoch(self) -> None:
        """Count an epoch; the end of the normalizer's epoch fixes the normalizer.

        Raises ``RuntimeError`` (and changes nothing) when the normalizer's epoch had no step.
        """
        if not self.log_transform or self.normalizer is not None:
            return
        if self._epoch == self.warmup_epochs:
            if self._loss_sum is None:
                raise RuntimeError(
                    "STCH's normalizer epoch had no step: the normalizer is its average loss"
                )
            self.normalizer = [s / self._loss_count for s in self._loss_sum]
        self._epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "loss_sum": None if self._loss_sum is None else list(self._loss_sum),
            "loss_count": self._loss_count,
            "normalizer": None if self.normalizer is None else list(self.normalizer),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        expected = {"epoch", "loss_sum", "loss_count", "normalizer"}
        if set(state_dict) != expected:
            raise ValueError(
                f"not an STCH state: expected keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        epoch, count = state_dict["epoch"], state_dict["loss_count"]
        if not (isinstance(epoch, int) and isinstance(count, int) and epoch >= 0 and count >= 0):
            raise ValueError("not an STCH state: epoch and loss_count must be ints >= 0")
        loss_sum, normalizer = state_dict["loss_sum"], state_dict["normalizer"]
        if loss_sum is not None:
            loss_sum = as_floats(loss_sum, "loss_sum")
        if normalizer is not None:
            normalizer = as_floats(normalizer, "normalizer")
            require_positive(normalizer, "STCH's saved normalizer")
        self._epoch, self._loss_count = epoch, count
        self._loss_sum, self.normalizer = loss_sum, normalizer

    def __repr__(self) -> str:
        if not self.log_transform:
            return f"STCH(mu={self.mu}, log_transform=False)"
        return f"STCH(mu={self.mu}, warmup_epochs={self.warmup_epochs})"
