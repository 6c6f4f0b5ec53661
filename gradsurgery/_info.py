"""What one update saw and did: the step's info object, built lazily from Python floats.

A training loop that ignores the diagnostics does not pay for them: the pipeline hands over
the ``T`` loss values, the ``[T, T]`` Gramian rows (or the ``T`` squared norms) and the
weights as Python floats, and the tensors are built only when an attribute is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ConflictStats", "GradNormInfo", "PCGradInfo", "StepInfo"]


def float64(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


class StepInfo:
    """What one ``backward(losses)`` call saw and did (gradients on the shared parameters).

    Every statistic is of the unscaled gradients (under a ``GradScaler`` too) and, under
    torch.distributed, of the global batch. Statistics that the method did not need are
    ``None``: a loss weighting computes no per-task gradient, so it has no norms or cosines.

    Attributes
    ----------
    weights : Tensor or None
        ``[T]`` float64 weights of the task gradients in the update (``None`` for a method that
        writes a direction of its own).
    losses : Tensor
        ``[T]`` float64 loss values.
    gramian : Tensor or None
        ``[T, T]`` float64 Gramian ``G[i, j] = g_i . g_j`` of the task gradients.
    grad_norms : Tensor or None
        ``[T]`` norms of the task gradients.
    cosine : Tensor or None
        ``[T, T]`` cosine similarities of the task gradients.
    num_conflicts : int or None
        Pairs ``i < j`` with ``g_i . g_j < 0``.
    conflict_rate : float or None
        ``num_conflicts`` over the ``T (T - 1) / 2`` pairs (0 when ``T = 1``).
    skipped : bool
        ``True`` when no update was made: a non-finite loss or gradient with
        ``nonfinite="skip"`` (the next ``step()`` is skipped too), or non-finite gradients left
        in ``.grad`` for a ``GradScaler`` to skip.
    nonfinite_tasks : tuple of int
        Tasks whose loss or gradient held NaN or Inf.
    extras : dict
        The method's own diagnostics (Python values), also readable as attributes.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
    >>> opt = gs.MultiTaskOptimizer(torch.optim.SGD([w], lr=0.1), gs.methods.Mean())
    >>> info = opt.backward([w[0] - w[1], 2 * w[1]])
    >>> info.weights, info.grad_norms
    (tensor([0.5000, 0.5000], dtype=torch.float64), None)
    """

    __slots__ = (
        "_gramian",
        "_losses",
        "_squared_norms",
        "_weights",
        "extras",
        "nonfinite_tasks",
        "skipped",
    )

    def __init__(
        self,
        losses: Sequence[float],
        *,
        weights: Sequence[float] | None = None,
        gramian: list[list[float]] | None = None,
        squared_norms: Sequence[float] | None = None,
        skipped: bool = False,
        nonfinite_tasks: Sequence[int] = (),
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        self._losses = losses
        self._weights = weights
        self._gramian = gramian  # T lists of T floats
        self._squared_norms = squared_norms
        self.skipped = skipped
        self.nonfinite_tasks = tuple(nonfinite_tasks)
        self.extras = dict(extras) if extras else {}

    @property
    def num_tasks(self) -> int:
        return len(self._losses)

    @property
    def losses(self) -> Tensor:
        return float64(self._losses)

    @property
    def weights(self) -> Tensor | None:
        return None if self._weights is None else float64(self._weights)

    @property
    def gramian(self) -> Tensor | None:
        return None if self._gramian is None else float64(self._gramian)

    @property
    def grad_norms(self) -> Tensor | None:
        if self._squared_norms is not None:
            return torch.from_numpy(np.sqrt(np.clip(self._squared_norms, 0, None)))
        if self._gramian is None:
            return None
        return torch.from_numpy(np.sqrt(np.clip(np.diagonal(self._gramian), 0, None)))

    @property
    def cosine(self) -> Tensor | None:
        if self._gramian is None:
            return None
        G = np.array(self._gramian, dtype=np.float64)
        norms = np.sqrt(np.clip(np.diagonal(G), 0, None))
        outer = np.outer(norms, norms)
        return torch.from_numpy(np.divide(G, outer, out=np.zeros_like(G), where=outer > 0))

    @property
    def num_conflicts(self) -> int | None:
        if self._gramian is None:
            return None
        return sum(
            row[j] < 0 for i, row in enumerate(self._gramian) for j in range(i + 1, len(row))
        )

    @property
    def conflict_rate(self) -> float | None:
        conflicts = self.num_conflicts
        if conflicts is None:
            return None
        pairs = self.num_tasks * (self.num_tasks - 1) // 2
        return conflicts / pairs if pairs else 0.0

    def __getattr__(self, name: str) -> Any:
        # The method's diagnostics read as attributes (info.targets, info.projections...).
        if not name.startswith("_"):
            try:
                return self.extras[name]
            except (KeyError, AttributeError):
                pass
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        return {slot: getattr(self, slot) for slot in _all_slots(type(self))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for slot, value in state.items():
            object.__setattr__(self, slot, value)

    def __repr__(self) -> str:
        parts = [f"weights={self.weights}"]
        if self._gramian is not None or self._squared_norms is not None:
            parts.append(f"grad_norms={self.grad_norms}")
        if self._gramian is not None:
            parts.append(f"num_conflicts={self.num_conflicts}")
        parts.append(f"skipped={self.skipped}")
        return f"{type(self).__name__}({', '.join(parts)})"


class PCGradInfo(StepInfo):
    """What one :meth:`PCGrad.pc_backward` call saw and did (all on the shared parameters).

    A :class:`StepInfo` with PCGrad's projections. The statistics are derived from the step's
    ``[T, T]`` Gramian when first read, so a training loop that ignores them does not pay for
    them.

    Attributes
    ----------
    gramian : Tensor
        ``[T, T]`` float64 Gramian ``G[i, j] = g_i . g_j`` of the original task gradients.
    grad_norms : Tensor
        ``[T]`` norms of the original task gradients.
    cosine : Tensor
        ``[T, T]`` cosine similarities of the original task gradients.
    num_conflicts : int
        Pairs ``i < j`` with ``g_i . g_j < 0``.
    conflict_rate : float
        ``num_conflicts`` over the ``T (T - 1) / 2`` pairs (0 when ``T = 1``).
    projections : Tensor
        ``[T, T]`` bool, ``projections[i, j]`` when ``g_i`` was projected onto ``g_j``'s
        normal plane.
    weights : Tensor
        ``[T]`` float64: the written gradient (on the shared parameters) is
        ``sum_i weights[i] g_i``.
    losses : Tensor
        ``[T]`` float64 loss values.
    skipped : bool
        ``True`` when no surgery was done: a non-finite loss or gradient with
        ``nonfinite="skip"`` (the next :meth:`PCGrad.step` is skipped too), or non-finite
        gradients left for a ``GradScaler`` to skip.
    nonfinite_tasks : tuple of int
        Tasks whose loss or gradient held NaN or Inf.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
    >>> opt = gs.PCGrad(torch.optim.SGD([w], lr=0.1))
    >>> info = opt.pc_backward([w[0] - w[1], w[1] - w[0] + 0.5 * w.sum()])
    >>> info.num_conflicts, info.conflict_rate
    (1, 1.0)
    >>> info.cosine[0, 1] < 0
    tensor(True)
    """

    __slots__ = ()

    @property
    def projections(self) -> Tensor:
        projected = np.zeros((self.num_tasks, self.num_tasks), dtype=bool)
        for i, j in self.extras.get("projections", ()):
            projected[i, j] = True
        return torch.from_numpy(projected)

    def __repr__(self) -> str:
        return (
            f"PCGradInfo(grad_norms={self.grad_norms}, num_conflicts={self.num_conflicts}, "
            f"conflict_rate={self.conflict_rate:.3f}, skipped={self.skipped})"
        )


class GradNormInfo(StepInfo):
    """What one GradNorm update saw and did.

    A :class:`StepInfo` with GradNorm's own quantities.

    Attributes
    ----------
    weights : Tensor
        ``[T]`` float64 task weights after the update (those the weighted backward used).
    grad_norms : Tensor
        ``[T]`` raw norms ``||grad_W L_i||`` at the shared parameters ``W``.
    losses : Tensor
        ``[T]`` float64 loss values.
    weighted_grad_norms : Tensor
        ``[T]`` ``G_i = w_i ||grad_W L_i||`` with the weights before the update.
    targets : Tensor
        ``[T]`` target norms ``mean(G) * r_i^alpha``, with ``r_i`` the relative inverse
        training rate ``loss_ratios[i] / mean(loss_ratios)``.
    loss_ratios : Tensor
        ``[T]`` loss ratios ``L_i(t) / L_i(0)`` (the paper's inverse training rates).
    gradnorm_loss : float
        ``sum_i |G_i - target_i|`` before the update.
    weight_gradient : Tensor
        ``[T]`` gradient of the GradNorm loss with respect to the learned vector (the
        log-weights, or the raw weights with ``parametrization="renormalize"``).
    skipped : bool
        ``True`` when the weights were not updated (a non-finite loss or gradient); the
        quantities above are then NaN.
    nonfinite_tasks : tuple of int
        Tasks whose loss or gradient held NaN or Inf.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> gn = gs.GradNorm(num_tasks=2, shared_parameters=[w], alpha=0.0)
    >>> info = gn.update_weights([(w**2).sum(), 3 * w.sum()])
    >>> info.grad_norms
    tensor([4.4721, 4.2426], dtype=torch.float64)
    >>> info.targets  # alpha = 0: every target is the mean norm
    tensor([4.3574, 4.3574], dtype=torch.float64)
    >>> bool(info.weights[0] < 1)  # task 0's norm is above target: its weight goes down
    True
    """

    __slots__ = ()

    def _vector(self, name: str) -> Tensor:
        values = self.extras.get(name)
        return float64(values if values is not None else [math.nan] * self.num_tasks)

    @property
    def weighted_grad_norms(self) -> Tensor:
        return self._vector("weighted_grad_norms")

    @property
    def targets(self) -> Tensor:
        return self._vector("targets")

    @property
    def loss_ratios(self) -> Tensor:
        return self._vector("loss_ratios")

    @property
    def weight_gradient(self) -> Tensor:
        return self._vector("weight_gradient")

    @property
    def gradnorm_loss(self) -> float:
        return self.extras.get("gradnorm_loss", math.nan)

    def __repr__(self) -> str:
        return (
            f"GradNormInfo(weights={self.weights}, grad_norms={self.grad_norms}, "
            f"gradnorm_loss={self.gradnorm_loss:.4g}, skipped={self.skipped})"
        )


@dataclass
class ConflictStats:
    """Running conflict statistics of a :class:`PCGrad` wrapper since it was created.

    Attributes
    ----------
    steps : int
        Surgeries done (skipped steps do not count).
    conflicting_pairs : int
        Conflicting pairs seen, summed over steps.
    pairs : int
        Pairs seen, summed over steps.
    pair_conflicts : Tensor or None
        ``[T, T]`` symmetric counts of the steps in which tasks ``i`` and ``j`` conflicted.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
    >>> opt = gs.PCGrad(torch.optim.SGD([w], lr=0.1))
    >>> for _ in range(2):
    ...     _ = opt.pc_backward([w[0] - w[1], w[1] - w[0] + 0.5 * w.sum()])
    >>> opt.conflict_stats.steps, opt.conflict_stats.conflict_rate
    (2, 1.0)
    """

    steps: int = 0
    conflicting_pairs: int = 0
    pairs: int = 0
    pair_conflicts: Tensor | None = field(default=None)

    @property
    def conflict_rate(self) -> float:
        """Fraction of the pairs seen that conflicted."""
        return self.conflicting_pairs / self.pairs if self.pairs else 0.0

    def update(self, gramian: list[list[float]]) -> None:
        """Count the conflicts of one step's ``[T, T]`` Gramian."""
        num_tasks = len(gramian)
        if self.pair_conflicts is None:
            self.pair_conflicts = torch.zeros(num_tasks, num_tasks, dtype=torch.long)
        self.steps += 1
        self.pairs += num_tasks * (num_tasks - 1) // 2
        conflicts = [
            (i, j) for i, row in enumerate(gramian) for j in range(i + 1, len(row)) if row[j] < 0
        ]
        if conflicts:  # most steps of most runs have none
            self.conflicting_pairs += len(conflicts)
            counts = self.pair_conflicts.numpy()  # shares memory
            for i, j in conflicts:
                counts[i, j] += 1
                counts[j, i] += 1


def _all_slots(cls: type) -> list[str]:
    return [s for c in cls.__mro__ for s in getattr(c, "__slots__", ())]
