"""Uncertainty weighting (Kendall, Gal & Cipolla 2018)."""

from __future__ import annotations

import torch

from .._weighting import Decision, TaskStats
from ..functional._losses import require_positive
from ..functional._uw import _uw_gradient, _uw_weights
from ._learned import LearnedLossWeighting

__all__ = ["UW"]


class UW(LearnedLossWeighting):
    r"""Uncertainty weighting: learned log-variances ``s`` weigh the losses.

    The model and ``s`` descend ``sum_i exp(-s_i) L_i / 2 + s_i / 2`` together: the model's
    gradient is ``sum_i w_i grad L_i`` with ``w_i = exp(-s_i) / 2``, and at its optimum
    ``s_i = log L_i``, so each task's weight settles at ``1 / (2 L_i)``.

    ``s`` is a ``torch.nn.Parameter`` (:attr:`log_variances`) trained by *your* optimizer, as in
    the paper: the wrapper (``gs.UW(optimizer, num_tasks=T)`` or
    ``gs.MultiTaskOptimizer(optimizer, method)``) adds :meth:`parameters` to the optimizer with
    its defaults (into its first parameter group that has them, else as a new group), unless the
    optimizer already holds them (put them there yourself for another learning rate).

    Parameters
    ----------
    num_tasks : int
        ``T``.
    initial_log_variance : float
        Starting ``s_i`` (default 0, equal weights of 1/2; LibMTL starts from -0.5).
    device, dtype
        Where and in which dtype the log-variances live (default: CPU, float32).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.uw import UW
    >>> method = UW(2)
    >>> decision = method.decide(TaskStats(losses=(1.0, 3.0)))
    >>> decision.weights
    [0.5, 0.5]
    >>> decision.parameter_grads[method.log_variances]
    [0.0, -1.0]
    """

    _parameter_name = "log_variances"
    log_variances: torch.nn.Parameter

    def __init__(
        self,
        num_tasks: int,
        *,
        initial_log_variance: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_tasks, initial_log_variance, device=device, dtype=dtype)

    def decide(self, stats: TaskStats) -> Decision:
        losses = stats.losses
        require_positive(losses, "UW (a negative loss has no optimal log-variance)", zero=True)
        weights = _uw_weights(self._values())
        gradient = _uw_gradient(list(losses), weights)
        return Decision(weights=weights, parameter_grads=self._decision_parameters(gradient))
