"""The plain mean of the task losses: the baseline every method is compared with."""

from __future__ import annotations

from .._weighting import Decision, Method, Needs, TaskStats

__all__ = ["Mean"]


class Mean(Method):
    """Descend the mean of the task losses, ``(1 / T) sum_i L_i``.

    No per-task gradient is computed: a step is one backward pass, as ``mean(losses).backward()``.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> opt = gs.Mean(torch.optim.SGD([w], lr=0.1))
    >>> info = opt.backward([w.sum(), 3 * w[0]])
    >>> w.grad
    tensor([2.0000, 0.5000])
    """

    needs = Needs.LOSSES

    def decide(self, stats: TaskStats) -> Decision:
        return Decision([1.0 / stats.num_tasks] * stats.num_tasks)
