"""PCGrad (Yu et al. 2020): project each task gradient off the others it conflicts with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import functional as F
from .._info import ConflictStats, PCGradInfo
from .._validation import check_generator, check_reduction
from .._weighting import Decision, Method, Needs, TaskStats

__all__ = ["PCGrad"]


class PCGrad(Method):
    """Projecting Conflicting Gradients (Yu et al. 2020).

    For each task ``i`` in turn, and each other task ``j`` in a random order, a conflicting
    ``g_i' . g_j < 0`` is removed by projecting ``g_i'`` onto ``g_j``'s normal plane. The
    projected gradients are linear combinations of the original ones, so the whole surgery
    runs on the ``[T, T]`` Gramian (:func:`gradsurgery.functional.pcgrad`) and its result is
    one weight per task. Parameters outside the shared set are never projected: they get the
    plain mean (or sum) of the gradients of the tasks that reach them.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How the projected task gradients are combined. ``"mean"`` (default) keeps the scale of
        the mean task loss; ``"sum"`` is the paper's.
    generator : torch.Generator, optional
        Source of the random projection orders. Defaults to a private CPU generator seeded with
        ``torch.initial_seed()``; its state is saved with the wrapper's ``state_dict``.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> x = torch.randn(8, 4)
    >>> losses = [model(x)[:, 0].pow(2).mean(), (model(x)[:, 1] - 1).pow(2).mean()]
    >>> opt.zero_grad()
    >>> info = opt.pc_backward(losses)
    >>> opt.step()
    >>> info.grad_norms.shape, info.num_conflicts in (0, 1)
    (torch.Size([2]), True)
    """

    needs = Needs.GRAMIAN
    info_class = PCGradInfo

    def __init__(self, reduction: str = "mean", generator: torch.Generator | None = None) -> None:
        self.reduction = check_reduction(reduction)
        self.unshared = self.reduction  # type: ignore[misc]  # the heads: plain mean or sum
        if check_generator(generator) is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator
        self.conflict_stats = ConflictStats()

    def decide(self, stats: TaskStats) -> Decision:
        gramian = stats.gramian_rows
        assert gramian is not None
        weights, projections = F._pcgrad_weights(gramian, self.generator, self.reduction)
        return Decision(weights, state=gramian, extras={"projections": projections})

    def commit(self, state: Any) -> None:
        self.conflict_stats.update(state)

    def reset(self) -> None:
        self.conflict_stats = ConflictStats()

    def state_dict(self) -> dict[str, Any]:
        stats = self.conflict_stats
        return {
            "conflict_stats": {
                "steps": stats.steps,
                "conflicting_pairs": stats.conflicting_pairs,
                "pairs": stats.pairs,
                "pair_conflicts": stats.pair_conflicts,
            }
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        stats = state_dict.get("conflict_stats") if isinstance(state_dict, Mapping) else None
        fields = {"steps", "conflicting_pairs", "pairs", "pair_conflicts"}
        if not isinstance(stats, Mapping) or set(stats) != fields:
            raise ValueError(
                f"not a PCGrad state: expected conflict_stats with {sorted(fields)}, got "
                f"{state_dict!r:.200}"
            )
        counts = stats["pair_conflicts"]
        if counts is not None and not (isinstance(counts, torch.Tensor) and counts.dim() == 2):
            raise ValueError(
                f"conflict_stats.pair_conflicts must be a [T, T] tensor, got {counts!r}"
            )
        self.conflict_stats = ConflictStats(
            int(stats["steps"]),
            int(stats["conflicting_pairs"]),
            int(stats["pairs"]),
            None if counts is None else counts.clone(),
        )

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        counts = self.conflict_stats.pair_conflicts
        if counts is not None and counts.shape[0] != num_tasks:
            raise ValueError(
                f"{num_tasks} losses, but this PCGrad's statistics are for {counts.shape[0]} tasks"
            )

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r})"
