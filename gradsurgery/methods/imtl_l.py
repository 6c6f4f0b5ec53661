"""IMTL-L, the loss-balancing half of impartial multi-task learning (Liu et al. 2021)."""

from __future__ import annotations

import torch

from .._weighting import Decision, TaskStats
from ..functional._imtl_l import _imtl_l_gradient, _imtl_l_weights
from ..functional._losses import require_positive
from ._learned import LearnedLossWeighting

__all__ = ["IMTLL"]


class IMTLL(LearnedLossWeighting):
    r"""IMTL-L: learned log-scales ``s`` make every scaled loss ``exp(s_i) L_i`` equal one.

    The model and ``s`` descend ``sum_i exp(s_i) L_i - s_i`` together: the model's gradient is
    ``sum_i exp(s_i) grad L_i`` and ``s``'s is ``exp(s_i) L_i - 1``. It is uncertainty
    weighting with ``s -> -s`` and a factor 2 (same weights up to that factor, same optima).

    ``s`` is a ``torch.nn.Parameter`` (:attr:`log_scales`) trained by *your* optimizer, as in
    the paper: the wrapper (``gs.IMTLL(optimizer, num_tasks=T)`` or
    ``gs.MultiTaskOptimizer(optimizer, method)``) adds :meth:`parameters` to the optimizer with
    its defaults (into its first parameter group that has them, else as a new group), unless the
    optimizer already holds them (put them there yourself for another learning rate).

    Parameters
    ----------
    num_tasks : int
        ``T``.
    initial_log_scale : float
        Starting ``s_i`` (default 0: the plain sum of the losses, as the authors' code).
    device, dtype
        Where and in which dtype the log-scales live (default: CPU, float32).

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.imtl_l import IMTLL
    >>> method = IMTLL(2)
    >>> decision = method.decide(TaskStats(losses=(1.0, 3.0)))
    >>> decision.weights
    [1.0, 1.0]
    >>> decision.parameter_grads[method.log_scales]
    [0.0, 2.0]
    """

    _parameter_name = "log_scales"
    log_scales: torch.nn.Parameter

    def __init__(
        self,
        num_tasks: int,
        *,
        initial_log_scale: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_tasks, initial_log_scale, device=device, dtype=dtype)

    def decide(self, stats: TaskStats) -> Decision:
        losses = stats.losses
        require_positive(losses, "IMTL-L (a negative loss has no optimal scale)", zero=True)
        weights = _imtl_l_weights(self._values())
        gradient = _imtl_l_gradient(list(losses), weights)
        return Decision(weights=weights, parameter_grads=self._decision_parameters(gradient))
