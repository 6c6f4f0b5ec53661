"""PCGrad (Yu et al. 2020) as a wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from ._distributed import synchronizer
from ._engine import AutogradEngine, accumulate_grads, as_parameter_list
from ._partition import BatchPartitionEngine
from ._validation import (
    NonFiniteError,
    check_losses,
    check_nonfinite_policy,
    check_num_tasks,
    check_reduction,
    loss_values,
    nonfinite_values,
)


class PCGradInfo:
    """What one :meth:`PCGrad.pc_backward` call saw and did (all on the shared parameters).

    The statistics are derived from the step's ``[T, T]`` Gramian when first read, so a
    training loop that ignores them does not pay for them.

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

    __slots__ = ("_gramian", "_projections", "nonfinite_tasks", "skipped")

    def __init__(
        self,
        gramian: list[list[float]],
        projections: Sequence[tuple[int, int]] = (),
        *,
        skipped: bool = False,
        nonfinite_tasks: Sequence[int] = (),
    ) -> None:
        self._gramian = gramian  # T lists of T floats; the tensors are built when read
        self._projections = projections  # (i, j) pairs
        self.skipped = skipped
        self.nonfinite_tasks = tuple(nonfinite_tasks)

    @property
    def projections(self) -> Tensor:
        return torch.from_numpy(F._projection_matrix(self._projections, len(self._gramian)))

    @property
    def gramian(self) -> Tensor:
        return torch.tensor(self._gramian, dtype=torch.float64)

    @property
    def grad_norms(self) -> Tensor:
        return torch.from_numpy(np.sqrt(np.clip(np.diagonal(self._gramian), 0, None)))

    @property
    def cosine(self) -> Tensor:
        return torch.from_numpy(F._cosine_similarity_matrix(np.array(self._gramian)))

    @property
    def num_conflicts(self) -> int:
        return len(F._conflicts(self._gramian))

    @property
    def conflict_rate(self) -> float:
        num_tasks = len(self._gramian)
        num_pairs = num_tasks * (num_tasks - 1) // 2
        return self.num_conflicts / num_pairs if num_pairs else 0.0

    def __repr__(self) -> str:
        return (
            f"PCGradInfo(grad_norms={self.grad_norms}, num_conflicts={self.num_conflicts}, "
            f"conflict_rate={self.conflict_rate:.3f}, skipped={self.skipped})"
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
        """Count the conflicts of one step's ``[T, T]`` Gramian (called by PCGrad)."""
        num_tasks = len(gramian)
        if self.pair_conflicts is None:
            self.pair_conflicts = torch.zeros(num_tasks, num_tasks, dtype=torch.long)
        self.steps += 1
        self.pairs += num_tasks * (num_tasks - 1) // 2
        conflicts = F._conflicts(gramian)
        if conflicts:  # most steps of most runs have none
            self.conflicting_pairs += len(conflicts)
            counts = self.pair_conflicts.numpy()  # shares memory
            for i, j in conflicts:
                counts[i, j] += 1
                counts[j, i] += 1


class PCGrad(torch.optim.Optimizer):
    """Projecting Conflicting Gradients (Yu et al. 2020) around any ``torch.optim`` optimizer.

    The wrapper behaves as the optimizer it wraps (``param_groups``, ``zero_grad``, ``step``,
    ``add_param_group``, ``state_dict``, learning-rate schedulers); :meth:`pc_backward` takes
    the place of ``loss.backward()``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to wrap; its parameters are the ones PCGrad writes ``.grad`` into.
    reduction : {"mean", "sum"}
        How the projected task gradients are combined. ``"mean"`` (default) keeps the scale of
        the mean task loss; ``"sum"`` is the paper's.
    generator : torch.Generator, optional
        Source of the random projection orders. Defaults to a private CPU generator seeded with
        ``torch.initial_seed()``; its state is part of :meth:`state_dict`.
    shared_parameters : module or iterable of Tensor, optional
        The parameters to do surgery on. By default, those that every task's autograd graph
        reaches. The others (task-specific heads, unused parameters) are never projected: they
        get the plain mean (or sum) of the gradients of the tasks that reach them.
    num_tasks : int, optional
        Number of tasks; by default fixed by the first :meth:`pc_backward` call. Every call must
        pass that many losses.
    nonfinite : {"raise", "skip"}
        What a NaN or Inf in a loss or gradient does: raise :class:`NonFiniteError` (default), or
        skip the surgery and the next :meth:`step`, reported as ``info.skipped``. Either way,
        ``.grad`` and all state are left as they were.
    engine : BatchPartitionEngine, optional
        How the per-task gradients are computed: one autograd call per task by default, or
        one backward pass over a task-partitioned batch (see :class:`BatchPartitionEngine`).
    distributed : bool, optional
        Average the per-task gradients over the processes of ``process_group`` (one
        all-reduce per step) before the surgery, so every process applies the surgery of the
        global batch. ``None`` (default): whenever torch.distributed is initialized with more
        than one process.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; the default group when ``None``. At the first
        synchronized step every process takes the generator state of the group's first
        process, so all of them draw the same projection orders.

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

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        shared_parameters: Iterable[Tensor] | torch.nn.Module | None = None,
        num_tasks: int | None = None,
        nonfinite: str = "raise",
        engine: BatchPartitionEngine | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called: the wrapper owns no
        # parameters or state of its own, it shares those of the wrapped optimizer.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        self.optimizer = optimizer
        self.reduction = check_reduction(reduction)
        self.nonfinite = check_nonfinite_policy(nonfinite)
        self.num_tasks = None if num_tasks is None else check_num_tasks(num_tasks)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        self.generator = generator
        self._shared_ids = (
            None
            if shared_parameters is None
            else {id(p) for p in as_parameter_list(shared_parameters, "shared_parameters")}
        )
        self.engine = engine if engine is not None else AutogradEngine()
        self.distributed = distributed
        self.process_group = process_group
        self.conflict_stats = ConflictStats()
        self._skip_next_step = False
        self._generator_shared = False  # across processes, once synchronized

    # -- the torch.optim.Optimizer protocol, delegated to the wrapped optimizer --------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the wrapped optimizer, unless the last :meth:`pc_backward` was skipped."""
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step(closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        """Register a hook run before each step of the wrapped optimizer."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        """Register a hook run after each step of the wrapped optimizer."""
        return self.optimizer.register_step_post_hook(hook)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the generator state and the conflict statistics."""
        stats = self.conflict_stats
        return {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "num_tasks": self.num_tasks,
            "conflict_stats": {
                "steps": stats.steps,
                "conflicting_pairs": stats.conflicting_pairs,
                "pairs": stats.pairs,
                "pair_conflicts": stats.pair_conflicts,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a resumed run continues bit-for-bit."""
        missing = {"optimizer", "generator", "num_tasks", "conflict_stats"} - state_dict.keys()
        if missing:
            raise KeyError(f"not a PCGrad state_dict: missing {sorted(missing)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.generator.set_state(state_dict["generator"])
        self._generator_shared = False  # processes may have loaded different checkpoints
        self.num_tasks = state_dict["num_tasks"]
        self.conflict_stats = ConflictStats(**state_dict["conflict_stats"])

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r}, optimizer={self.optimizer!r})"

    # -- the surgery -------------------------------------------------------------------------
    def pc_backward(
        self, losses: Sequence[Tensor], *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> PCGradInfo:
        """Write the PCGrad combination of the task gradients into ``.grad``.

        Like ``loss.backward()``, the result is added to ``.grad``: call :meth:`zero_grad`
        first. The autograd graph is freed.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Scale the losses with it (mixed precision). Non-finite gradients are then written
            as they are, for ``grad_scaler.step`` to skip the step and lower the scale.

        Returns
        -------
        PCGradInfo
            Norms, cosines, conflicts and projections of this step.

        Raises
        ------
        ValueError, TypeError
            On bad input (see :class:`PCGrad`); nothing is changed.
        NonFiniteError
            On a NaN or Inf loss or gradient with ``nonfinite="raise"``; nothing is changed.
        """
        self._skip_next_step = False
        losses = check_losses(losses, self.num_tasks)
        num_tasks = len(losses)
        values = loss_values(losses)
        sync = synchronizer(self.distributed, self.process_group)
        if sync is None:  # alone, refuse early; synchronized, every process decides together
            bad = nonfinite_values(values)
            if bad:
                return self._nonfinite(bad, "loss", num_tasks)

        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if grad_scaler is not None:
            losses = [grad_scaler.scale(loss) for loss in losses]
        # The Jacobian lives only within this call: the engine may reuse its matrix.
        jacobian = self.engine.jacobian(losses, params, reuse=True)
        if sync is not None:
            jacobian, values = sync.all_reduce(jacobian, values)
            if not self._generator_shared:
                sync.broadcast_generator(self.generator)
                self._generator_shared = True
            bad = nonfinite_values(values)
            if bad:
                return self._nonfinite(bad, "loss", num_tasks)
        all_reached = jacobian.all_reached  # the usual case: skips the masks below
        reached = None if all_reached else jacobian.reached
        if reached is not None and not reached.any():
            raise ValueError(
                "no parameter of the wrapped optimizer is reached by any loss: the losses do "
                "not depend on the parameters being optimized"
            )
        shared = None
        if not all_reached or self._shared_ids is not None:
            shared = self._shared_mask(params, jacobian.reached)
        mask = None if shared is None or shared.all() else shared
        # The [T, T] work happens on the CPU in float64 (Python floats), whatever the device
        # of the gradients: for T numbers per row, plain arithmetic costs less than any call.
        gramian = jacobian.gramian(mask).tolist()
        # A NaN or Inf gradient makes its Gramian row, and so the Gramian's sum, non-finite: the
        # exact (costlier) check only runs when the shared or the unshared parameters say so.
        finite = math.isfinite(sum(map(sum, gramian)))
        if finite and mask is not None:
            finite = bool(torch.isfinite(jacobian.squared_norms(~mask)).all())
        bad = [] if finite else jacobian.nonfinite_tasks()
        if bad and grad_scaler is None:
            return self._nonfinite(bad, "gradient", num_tasks)
        if not finite and not bad:  # finite gradients whose dot products overflow float32
            gramian = jacobian.gramian(mask, dtype=torch.float64).tolist()

        if bad:  # leave the overflow in .grad for the GradScaler to see and skip the step
            combined = jacobian.combine([1.0] * num_tasks)
            info = PCGradInfo(gramian, skipped=True, nonfinite_tasks=bad)
        else:
            weights, projected = F._pcgrad_weights(gramian, self.generator, self.reduction)
            if mask is not None:
                weights = self._with_unshared(weights, mask, jacobian.reached)
            combined = jacobian.combine(weights)
            info = PCGradInfo(gramian, projected)
            self.conflict_stats.update(gramian)
        if self.num_tasks is None:
            self.num_tasks = num_tasks

        # Parameters no task reaches keep their .grad (None stays None), as after backward().
        kept = None if reached is None else reached.any(axis=0)
        if kept is None or kept.all():
            accumulate_grads(params, combined)
        else:
            pairs = [(p, g) for p, g, k in zip(params, combined, kept, strict=True) if k]
            accumulate_grads([p for p, _ in pairs], [g for _, g in pairs])
        return info

    def _shared_mask(self, params: list[Tensor], reached: np.ndarray) -> np.ndarray:
        """Which parameters take part in the surgery (bool, one per parameter)."""
        if self._shared_ids is None:
            return reached.all(axis=0)
        return np.array([id(p) in self._shared_ids for p in params], dtype=bool)

    def _with_unshared(
        self, weights: Sequence[float], shared: np.ndarray, reached: np.ndarray
    ) -> Tensor:
        """Per-parameter weights ``[n_params, T]``: surgery's where shared, plain elsewhere."""
        rows = torch.ones(len(shared), len(weights), dtype=torch.float64)
        if self.reduction == "mean":
            # Mean over the tasks that reach each parameter, not over all T: a task-specific
            # head learns at the same rate as it would alone.
            rows /= torch.from_numpy(np.maximum(reached.sum(axis=0), 1))[:, None]
        rows[torch.from_numpy(shared)] = torch.tensor(weights, dtype=torch.float64)
        return rows

    def _nonfinite(self, bad: list[int], what: str, num_tasks: int) -> PCGradInfo:
        tasks = ", ".join(map(str, bad))
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"the {what} of task(s) {tasks} holds NaN or Inf; nothing was changed "
                "(pass nonfinite='skip' to skip such steps instead)"
            )
        self._skip_next_step = True
        nan = [[math.nan] * num_tasks for _ in range(num_tasks)]
        return PCGradInfo(nan, skipped=True, nonfinite_tasks=bad)
