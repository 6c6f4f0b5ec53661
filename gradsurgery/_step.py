"""The update pipeline: the one path every method's step goes through.

check the losses -> per-task quantities from the engine, as the method's ``needs`` asks (loss
values only: no per-task gradient at all) -> synchronize across processes (one collective)
-> NaN/Inf policy -> unscale (GradScaler) -> ``method.decide`` -> combine and write ``.grad``
once, checking that what is written is finite -> ``method.commit`` -> the step's info.

Nothing is changed before the last check has passed: a refused step leaves ``.grad``, the
method's state and its random generator as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ._autograd import AutogradEngine, graph_leaves, reaches_any, seeded_grad
from ._distributed import synchronizer
from ._floats import floats_tensor
from ._grads import accumulate_grads, all_finite, fresh_all_finite
from ._info import StepInfo
from ._jacobian import Engine, TaskJacobian
from ._validation import NonFiniteError, check_losses, loss_values, nonfinite_values
from ._weighting import Decision, Method, Needs, TaskStats

__all__ = ["UpdatePipeline"]

_UNSHARED_RULES = ("weights", "mean", "sum")


class _Refused(Exception):
    """A non-finite step under ``nonfinite="skip"``: unwound to :meth:`UpdatePipeline.run`."""

    def __init__(self, tasks: Sequence[int]) -> None:
        self.tasks = list(tasks)


class UpdatePipeline:
    """Runs one method's steps: everything a method does not do itself.

    Parameters
    ----------
    method : Method
        What decides the weights.
    engine : Engine, optional
        Where per-task gradients come from; the per-task autograd engine by default.
    shared : list of Tensor, optional
        The shared parameters, whose task gradients the method reads. ``None``: every parameter
        that every task reaches.
    nonfinite : {"raise", "skip"}
        What a NaN or Inf loss or gradient does.
    num_tasks : int, optional
        The number of losses every step takes; fixed by the first step when ``None``.
    distributed, process_group
        As in :func:`gradsurgery._distributed.synchronizer`.
    """

    def __init__(
        self,
        method: Method,
        *,
        engine: Engine | None = None,
        shared: list[Tensor] | None = None,
        nonfinite: str = "raise",
        num_tasks: int | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if method.unshared not in _UNSHARED_RULES:
            raise ValueError(
                f"{type(method).__name__}.unshared must be one of {_UNSHARED_RULES}, got "
                f"{method.unshared!r}"
            )
        self.method = method
        self.engine: Engine = engine if engine is not None else AutogradEngine()
        self.shared = shared
        self._shared_ids = None if shared is None else {id(p) for p in shared}
        self._mask_key: tuple[int, ...] | None = None
        self._mask: np.ndarray | None = None
        self.nonfinite = nonfinite
        self.num_tasks = num_tasks
        self.distributed = distributed
        self.process_group = process_group
        self.generator_shared = False  # across processes, once synchronized
        self.last_weights: list[float] | None = None
        self._losses_reach_checked = False  # by a loss weighting, on its first step

    # -- the step ------------------------------------------------------------------------------
    def run(
        self,
        losses: Sequence[Tensor],
        params: list[Tensor] | None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        write: bool = True,
    ) -> tuple[StepInfo, bool]:
        """One step: write the method's update into ``.grad`` of ``params``.

        ``params=None`` writes into every parameter the losses reach (the shared ones first).
        ``write=False`` only decides and commits (the graph of ``losses`` is kept). Returns the
        info and whether the optimizer's next step must be skipped (``nonfinite="skip"``).
        """
        method = self.method
        losses = check_losses(losses, self.num_tasks)
        num_tasks = len(losses)
        method.check_num_tasks(num_tasks)
        values = loss_values(losses)
        sync = synchronizer(self.distributed, self.process_group)
        try:
            if sync is None:  # alone, refuse early; synchronized, every process decides together
                self._check_values(values, "loss")
            scale = None if grad_scaler is None else float(grad_scaler.get_scale())
            scaled = losses if grad_scaler is None else [grad_scaler.scale(x) for x in losses]
            if method.needs == Needs.LOSSES and sync is None:
                info = self._loss_weighting(scaled, values, params, scale, write)
            else:
                info = self._task_gradients(scaled, values, params, scale, write, sync)
        except _Refused as refused:
            return self._skipped_info(values, refused.tasks), True
        except RuntimeError as error:
            if "sparse" in str(error):  # autograd's message names reshape, not the cause
                raise TypeError(
                    "a loss produced a sparse gradient (nn.Embedding(sparse=True) or "
                    "nn.EmbeddingBag(sparse=True)?): per-task gradients are dense; build the "
                    "layer with sparse=False"
                ) from error
            raise
        if self.num_tasks is None:
            self.num_tasks = num_tasks
        return info, False

    def _loss_weighting(
        self,
        losses: list[Tensor],
        values: list[float],
        params: list[Tensor] | None,
        scale: float | None,
        write: bool,
    ) -> StepInfo:
        """A method that reads loss values only: one backward pass of ``sum_i w_i L_i``."""
        if params is not None and not self._losses_reach_checked:
            # A loss that reaches no optimized parameter (another model's, a head left out of
            # the optimizer) is a mistake made when the loop is written: refused on the first
            # step. Later steps skip the walk (1-2% of a small model's step): such a loss then
            # adds nothing, and the update stays the exact gradient of sum_i w_i L_i.
            wanted = {id(p) for p in params}
            _refuse_unreached([t for t, x in enumerate(losses) if not reaches_any(x, wanted)])
            self._losses_reach_checked = True
        stats = TaskStats(losses=tuple(values))
        with self._rollback_on_error():
            decision = self.method.decide(stats)
            weights = self._weights(decision, len(values))
            if write:
                targets = params if params is not None else graph_leaves(losses)
                targets, grads = _weighted_gradient(losses, weights, targets)
                if not targets:
                    raise ValueError(
                        "no parameter of the wrapped optimizer is reached by any loss: the "
                        "losses do not depend on the parameters being optimized"
                    )
                skipped = not fresh_all_finite(grads)
                if skipped and scale is None:
                    self._refuse_weighted()
                self._write(targets, grads, decision, scale)
                if skipped:  # left in .grad for the GradScaler to see and skip the step
                    return self.method.info_class(values, weights=weights, skipped=True)
        return self._commit(decision, weights, values)

    def _task_gradients(
        self,
        losses: list[Tensor],
        values: list[float],
        params: list[Tensor] | None,
        scale: float | None,
        write: bool,
        sync: Any,
    ) -> StepInfo:
        method, needs = self.method, self.method.needs
        # Narrow: the task gradients of the shared parameters only, then one weighted backward
        # for all parameters. Right when the method weighs every parameter alike and the engine
        # takes a backward pass per task anyway (or nothing is to be written).
        narrow = (
            self.shared is not None
            and needs in (Needs.NORMS, Needs.GRAMIAN)
            and (
                not write
                or (
                    sync is None
                    and method.unshared == "weights"
                    and not self.engine.single_backward
                )
            )
        )
        if narrow:
            # The Jacobian lives only within this call: the engine may reuse its matrix.
            jacobian = self.engine.jacobian(losses, self.shared, retain_graph=True, reuse=True)
            jparams: list[Tensor] = list(self.shared)
        elif params is None:
            jparams, jacobian = self.engine.reached_jacobian(losses, self.shared, reuse=True)
        else:
            jacobian = self.engine.jacobian(losses, params, reuse=True)
            jparams = params
        if sync is not None:
            jacobian, values = sync.all_reduce(jacobian, values)
            generator = method.generator
            if generator is not None and not self.generator_shared:
                sync.broadcast_generator(generator)
                self.generator_shared = True
            self._check_values(values, "loss")

        reached = None if jacobian.all_reached else jacobian.reached
        if narrow:
            stats_jacobian, mask = jacobian, None
        elif params is None:  # the shared parameters lead: their columns come first
            stats_jacobian, mask = jacobian.leading(len(self.shared)), None
        else:
            stats_jacobian, mask = jacobian, self._shared_mask(jparams, reached)
        self._check_reach(jacobian, reached, mask, narrow or params is None)

        gramian = squared_norms = None
        total = 0.0
        # The [T, T] work happens on the CPU in float64 (Python floats), whatever the device
        # of the gradients: for T numbers per row, plain arithmetic costs less than any call.
        # (In float64 from the start when float32 products would underflow or overflow.)
        if needs >= Needs.GRAMIAN:
            gramian = stats_jacobian.gramian_rows(mask)
            total = sum(map(sum, gramian))
        elif needs == Needs.NORMS:
            squared_norms = stats_jacobian.squared_norm_values(mask)
            total = sum(squared_norms)
        # A NaN or Inf gradient makes the sum non-finite: the exact (costlier) check only runs
        # when the sum says so. Finite gradients whose float64 products overflow pass on: the
        # method's non-finite weights, or the check of what is written, refuse them.
        if not math.isfinite(total):
            bad = stats_jacobian.nonfinite_tasks()
            if bad:
                if scale is None:
                    self._refuse(bad, "gradient")
                # An overflow under a GradScaler: leave it in .grad, the scaler skips the step.
                if write:
                    self._write_all(jacobian, jparams, reached, [1.0] * len(values), None, scale)
                return method.info_class(values, gramian=gramian, skipped=True, nonfinite_tasks=bad)
        # The norms of what the engine gave (scaled, if a GradScaler is in use), to bound the
        # combination below.
        diagonal = (
            [row[i] for i, row in enumerate(gramian)] if gramian is not None else squared_norms
        )
        if scale is not None:  # diagnostics and decisions see the unscaled gradients
            if gramian is not None:
                gramian = [[g / scale / scale for g in row] for row in gramian]
            if squared_norms is not None:
                squared_norms = [s / scale / scale for s in squared_norms]
            if needs == Needs.JACOBIAN:
                _unscale(jacobian, scale)

        stats = TaskStats(
            losses=tuple(values),
            gramian_rows=gramian,
            squared_norms=None if squared_norms is None else tuple(squared_norms),
            jacobian=jacobian if needs == Needs.JACOBIAN else None,
            shared=mask,
        )
        with self._rollback_on_error():
            decision = method.decide(stats)
            weights = self._weights(decision, len(values))
            if write and narrow:
                targets = params if params is not None else graph_leaves(losses)
                targets, grads = _weighted_gradient(losses, weights, targets)
                finite = fresh_all_finite(grads)
                if not finite and scale is None:
                    self._refuse_weighted()
                self._write(targets, grads, decision, scale)
            elif write:
                direction = decision.direction
                if direction is not None and scale is not None and needs == Needs.JACOBIAN:
                    direction = [d * scale for d in direction]
                # |sum_i w_i g_i| <= sum_i |w_i| ||g_i||: when that bound is far below the
                # dtype's largest value, the combination cannot overflow and needs no check.
                bounded = (
                    diagonal is not None
                    and stats_jacobian is jacobian
                    and mask is None
                    and direction is None
                    and not decision.parameter_grads
                    and _norm_bound(weights, diagonal) < 0.5 * torch.finfo(jacobian.dense.dtype).max
                )
                finite = self._write_all(
                    jacobian, jparams, reached, weights, mask, scale, decision, direction, bounded
                )
            else:
                finite = True
            if not finite:  # left in .grad for the GradScaler to see and skip the step
                return method.info_class(
                    values,
                    weights=weights,
                    gramian=gramian,
                    squared_norms=squared_norms,
                    skipped=True,
                )
        return self._commit(decision, weights, values, gramian, squared_norms)

    # -- pieces --------------------------------------------------------------------------------
    def _write_all(
        self,
        jacobian: TaskJacobian,
        params: list[Tensor],
        reached: np.ndarray | None,
        weights: list[float],
        mask: np.ndarray | None,
        scale: float | None,
        decision: Decision | None = None,
        direction: list[Tensor] | None = None,
        bounded: bool = False,
    ) -> bool:
        """Combine the task gradients and write them; ``False`` when the result is not finite
        (under a GradScaler, for the scaler to skip; otherwise refused before writing)."""
        rule = self.method.unshared
        if mask is None or rule == "weights":
            combined = jacobian.combine(weights)
        else:
            combined = jacobian.combine(_per_parameter_weights(weights, mask, reached, rule))
        if direction is not None:
            shared = range(len(params)) if mask is None else np.flatnonzero(mask).tolist()
            for k in shared:
                combined[k] = direction[k].reshape(-1)
        # Parameters no task reaches keep their .grad (None stays None), as after backward().
        kept = None if reached is None else reached.any(axis=0)
        if kept is not None and not kept.all():
            params = [p for p, k in zip(params, kept, strict=True) if k]
            combined = [g for g, k in zip(combined, kept, strict=True) if k]
        finite = bounded or all_finite(combined)
        if not finite and scale is None:
            bad = jacobian.nonfinite_tasks()
            if bad:
                self._refuse(bad, "gradient")
            dtype = combined[0].dtype
            self._refuse_overflow(dtype)
        self._write(params, combined, decision, scale)
        return finite

    def _write(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        decision: Decision | None,
        scale: float | None,
    ) -> None:
        extra = None if decision is None else decision.parameter_grads
        if extra:
            params = [*params, *extra]
            grads = [*grads, *self._parameter_grads(extra, scale)]
        accumulate_grads(params, grads)

    def _parameter_grads(
        self, extra: Mapping[Tensor, Tensor | Sequence[float]], scale: float | None
    ) -> list[Tensor]:
        """The method's learned parameters' gradients as fresh tensors in their parameters'
        dtype and device, checked (all of them, before anything is written) and scaled like the
        model's (for ``GradScaler.step`` to unscale)."""
        grads = []
        for parameter, grad in extra.items():
            size = grad.numel() if isinstance(grad, Tensor) else len(grad)
            if size != parameter.numel():
                raise ValueError(
                    f"{type(self.method).__name__}.decide returned a gradient of {size} values "
                    f"for a learned parameter of shape {tuple(parameter.shape)}"
                )
            if isinstance(grad, Tensor):
                if not all_finite([grad]):
                    self._refuse_weighted()
                grad = grad.detach().to(parameter.device, parameter.dtype, copy=True).view(-1)
                if scale is not None:
                    grad.mul_(scale)
            else:  # Python floats: checked and scaled as floats, packed into a new tensor
                if not all(map(math.isfinite, grad)):
                    self._refuse_weighted()
                if scale is not None:
                    grad = [g * scale for g in grad]
                grad = floats_tensor(grad, parameter.dtype, parameter.device)
            grads.append(grad)
        return grads

    def _commit(
        self,
        decision: Decision,
        weights: list[float],
        values: list[float],
        gramian: list[list[float]] | None = None,
        squared_norms: list[float] | None = None,
    ) -> StepInfo:
        self.method.commit(decision.state)
        self.last_weights = weights
        return self.method.info_class(
            values,
            weights=weights,
            gramian=gramian,
            squared_norms=squared_norms,
            extras=decision.extras,
        )

    def _weights(self, decision: Decision, num_tasks: int) -> list[float]:
        weights = decision.weights
        weights = weights.tolist() if isinstance(weights, Tensor) else list(weights)
        if len(weights) != num_tasks:
            raise ValueError(
                f"{type(self.method).__name__}.decide returned {len(weights)} weights for "
                f"{num_tasks} tasks"
            )
        if not math.isfinite(sum(weights)):
            bad = nonfinite_values(weights)
            self._fail(
                bad,
                f"{type(self.method).__name__} computed non-finite weights for task(s) "
                f"{_tasks(bad)} (the losses or gradients are finite but extreme)",
            )
        return weights

    def _shared_mask(self, params: list[Tensor], reached: np.ndarray | None) -> np.ndarray | None:
        """Which parameters are shared (bool per parameter); ``None`` when all are."""
        if self._shared_ids is None:
            if reached is None:
                return None
            mask = reached.all(axis=0)
        else:
            key = tuple(map(id, params))
            if key != self._mask_key:  # parameter lists rarely change: compute once
                self._mask = np.array([id(p) in self._shared_ids for p in params], dtype=bool)
                self._mask_key = key
            mask = self._mask
        return None if mask.all() else mask

    def _check_reach(
        self,
        jacobian: TaskJacobian,
        reached: np.ndarray | None,
        mask: np.ndarray | None,
        shared_only: bool,
    ) -> None:
        """Refuse a task that the shared (or any optimized) parameters never see: its weight
        would be decided from a zero gradient."""
        if reached is None:
            return
        name = type(self.method).__name__
        if self.shared is not None:
            if shared_only:
                at_shared = reached[:, : len(self.shared)].any(axis=1)
            else:
                at_shared = reached[:, mask].any(axis=1) if mask is not None else reached.any(1)
            if not at_shared.all():
                raise ValueError(
                    f"the loss of task(s) {_tasks(np.flatnonzero(~at_shared))} does not depend "
                    f"on the shared parameters, so {name} cannot weigh it: check that every "
                    "task's loss goes through shared_parameters"
                )
        if not reached.any():
            raise ValueError(
                "no parameter of the wrapped optimizer is reached by any loss: the losses do "
                "not depend on the parameters being optimized"
            )
        _refuse_unreached(np.flatnonzero(~reached.any(axis=1)))
        if self.shared is None and mask is not None and not mask.any():
            raise ValueError(
                f"no optimized parameter is reached by every task's loss, so {name} has no "
                "shared parameters to work on: pass shared_parameters=, or check the losses"
            )

    def _check_values(self, values: list[float], what: str) -> None:
        bad = nonfinite_values(values)
        if bad:
            self._refuse(bad, what)

    def _refuse(self, bad: Sequence[int], what: str) -> None:
        self._fail(bad, f"the {what} of task(s) {_tasks(bad)} holds NaN or Inf")

    def _refuse_weighted(self) -> None:
        self._fail([], "the weighted gradient sum_i w_i grad L_i holds NaN or Inf")

    def _refuse_overflow(self, dtype: torch.dtype) -> None:
        self._fail(
            [],
            f"the combined gradient overflows {dtype}, though every task gradient is finite "
            "(task gradients of very different magnitudes?); rescale the losses, or train in a "
            "wider dtype",
        )

    def _fail(self, bad: Sequence[int], message: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{message}; nothing was changed (pass nonfinite='skip' to skip such steps instead)"
            )
        raise _Refused(bad)

    def _skipped_info(self, values: list[float], bad: list[int]) -> StepInfo:
        num_tasks = len(values)
        needs = self.method.needs
        nan = math.nan
        return self.method.info_class(
            values,
            weights=self.last_weights,
            gramian=[[nan] * num_tasks for _ in range(num_tasks)]
            if needs >= Needs.GRAMIAN
            else None,
            squared_norms=[nan] * num_tasks if needs == Needs.NORMS else None,
            skipped=True,
            nonfinite_tasks=bad,
        )

    def _rollback_on_error(self) -> _GeneratorRollback:
        return _GeneratorRollback(self.method.generator)


class _GeneratorRollback:
    """Restores a random method's generator when its step is refused after it drew."""

    __slots__ = ("generator", "state")

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.state = None

    def __enter__(self) -> None:
        if self.generator is not None:
            self.state = self.generator.get_state()

    def __exit__(self, exc_type: Any, *_: object) -> None:
        if exc_type is not None and self.state is not None:
            assert self.generator is not None
            self.generator.set_state(self.state)


def _weighted_gradient(
    losses: list[Tensor], weights: list[float], params: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """``grad sum_i w_i L_i`` of the parameters it reaches, in their shapes (frees the graph).

    The weights enter as the losses' output gradients: no product or sum joins the graph.
    """
    first = losses[0]
    if all(x.dtype == first.dtype and x.device == first.device for x in losses):
        seeds = floats_tensor(weights, first.dtype, first.device).unbind()
    else:
        seeds = tuple(
            torch.tensor(w, dtype=x.dtype, device=x.device)
            for w, x in zip(weights, losses, strict=True)
        )
    found = seeded_grad(losses, seeds, params)
    targets = [p for p, g in zip(params, found, strict=True) if g is not None]
    return targets, [g for g in found if g is not None]


def _per_parameter_weights(
    weights: list[float], shared: np.ndarray, reached: np.ndarray | None, rule: str
) -> Tensor:
    """``[n_params, T]``: the method's weights where shared, the plain mean (over the tasks
    that reach each parameter: a task-specific head learns as it would alone) or sum elsewhere."""
    rows = torch.ones(len(shared), len(weights), dtype=torch.float64)
    if rule == "mean":
        counts = np.full(len(shared), len(weights)) if reached is None else reached.sum(axis=0)
        rows /= torch.from_numpy(np.maximum(counts, 1))[:, None]
    rows[torch.from_numpy(shared)] = torch.tensor(weights, dtype=torch.float64)
    return rows


def _norm_bound(weights: list[float], squared_norms: Sequence[float]) -> float:
    """An upper bound of every element of ``sum_i weights[i] g_i`` and of every weight."""
    bound = sum(
        abs(w) * math.sqrt(max(s, 0.0)) for w, s in zip(weights, squared_norms, strict=True)
    )
    # The weights are cast to the gradients' dtype as well: they must fit under the bound too.
    bound = max(bound, *map(abs, weights))
    return bound if math.isfinite(bound) else math.inf


def _unscale(jacobian: TaskJacobian, scale: float) -> None:
    """Divide the per-task gradients by the GradScaler's scale, in place."""
    jacobian.dense.div_(scale)
    for factors in jacobian.factored.values():
        factors.output_grads.div_(scale)


def _refuse_unreached(lost: Sequence[int]) -> None:
    if len(lost):
        raise ValueError(
            f"the loss of task(s) {_tasks(lost)} reaches none of the optimized parameters "
            "(a loss of another model, or a head left out of the optimizer?): add its "
            "parameters to the optimizer, or leave the loss out"
        )


def _tasks(indices: Any) -> str:
    return ", ".join(str(int(i)) for i in indices)
