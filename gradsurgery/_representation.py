"""Representation mode: the method works on the task gradients of a shared representation.

In a shared-input model (one encoder, one head per task, every task reading the same batch)
the exact per-task gradients of the encoder cost one backward pass through it per task. The
field's fast alternative (Sener & Koltun 2018, "MGDA-UB"; LibMTL's ``rep_grad``; the "UB"
variant of Aligned-MTL) takes the task gradients with respect to the encoder's output ``z``
instead (through the heads only), lets the method decide from their ``[T, T]`` Gramian, and
backpropagates the one combined gradient ``sum_i w_i dL_i/dz`` through the encoder.

What is approximated: the method reads ``G_ij = <dL_i/dz, dL_j/dz>`` over every element of
``z`` (for a ``[B, D]`` representation, the sum over the batch of the per-sample dot products)
instead of the Gramian of the encoder's parameter gradients, ``J_i^T J_j`` with
``J = dz/dtheta``. Given the weights, the encoder's gradient is exact:
``sum_i w_i dL_i/dtheta = (dz/dtheta)^T sum_i w_i dL_i/dz``. Heads get their own gradients as
the method's ``unshared`` rule says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._distributed import synchronizer
from ._grads import all_finite
from ._info import StepInfo
from ._jacobian import TaskJacobian
from ._step import UpdatePipeline, _per_parameter_weights, _Refused
from ._validation import check_choice, check_losses, loss_values
from ._weighting import Needs, TaskStats

__all__ = ["BATCH_CONVENTIONS", "check_representation", "representation_step"]

BATCH_CONVENTIONS = ("samples", "sum")

_AccumulateGrad = torch._C._functions.AccumulateGrad


def check_representation(representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The representation as a list of tensors, refused when it cannot be one."""
    tensors = [representation] if isinstance(representation, Tensor) else list(representation)
    if not tensors:
        raise ValueError("representation is empty: pass the encoder's output (one or more tensors)")
    for k, z in enumerate(tensors):
        name = "representation" if len(tensors) == 1 else f"representation[{k}]"
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} is a {type(z).__name__}, not a torch.Tensor")
        if not z.is_floating_point():
            raise TypeError(f"{name} has dtype {z.dtype}, expected a float dtype")
        if z.grad_fn is None:
            raise ValueError(
                f"{name} has no autograd graph behind it (a detached copy, or an input?): pass "
                "the encoder's output itself, as the heads read it, so that the combined "
                "gradient can flow back through the encoder"
            )
    if len({id(z) for z in tensors}) < len(tensors):
        raise ValueError("representation holds the same tensor twice")
    return tensors


def representation_step(
    pipeline: UpdatePipeline,
    losses: Sequence[Tensor],
    representation: Tensor | Sequence[Tensor],
    params: list[Tensor],
    *,
    grad_scaler: torch.amp.GradScaler | None = None,
    batch: str = "samples",
) -> tuple[StepInfo, bool]:
    """One step of ``pipeline``'s method in representation mode; writes ``.grad`` of
    ``params``. Returns the info and whether the optimizer's next step must be skipped.

    ``batch="samples"``: the Gramian of the flattened representation gradients (the sum over
    the batch of per-sample dot products, as the authors of MGDA-UB compute it);
    ``"sum"``: of the gradients summed over the batch dimension first (LibMTL's ``rep_grad``).
    """
    method = pipeline.method
    check_choice("representation_batch", batch, BATCH_CONVENTIONS)
    losses = check_losses(losses, pipeline.num_tasks)
    num_tasks = len(losses)
    method.check_num_tasks(num_tasks)
    reps = check_representation(representation)
    if batch == "sum":
        if method.needs == Needs.JACOBIAN:
            raise ValueError(
                f"{type(method).__name__} reads the gradients' coordinates, which a sum over "
                "the batch would not map back to the samples: use representation_batch="
                "'samples'"
            )
        flat = [k for k, z in enumerate(reps) if z.dim() == 0]
        if flat:
            raise ValueError(
                f"representation {flat} is a scalar, with no batch dimension to sum over: use "
                "representation_batch='samples'"
            )
    if synchronizer(pipeline.distributed, pipeline.process_group) is not None:
        raise ValueError(
            "representation mode does not synchronize across processes: every process's "
            "representation holds other samples, so their gradients cannot be averaged; "
            "construct the optimizer with distributed=False to decide per process, or leave "
            "representation= out for the exact mode"
        )
    heads, reached, readers = _heads(losses, reps, params)
    values = loss_values(losses)
    try:
        pipeline._check_values(values, "loss")
        if method.needs == Needs.LOSSES:  # no task gradient at all: the exact update is as cheap
            info, skip = pipeline.run(losses, params, grad_scaler=grad_scaler)
            return info, skip
        scale = None if grad_scaler is None else float(grad_scaler.get_scale())
        scaled = losses if grad_scaler is None else [grad_scaler.scale(x) for x in losses]
        info = _step(pipeline, scaled, values, reps, heads, reached, readers, params, scale, batch)
    except _Refused as refused:
        return pipeline._skipped_info(values, refused.tasks), True
    if pipeline.num_tasks is None:
        pipeline.num_tasks = num_tasks
    return info, False


def _step(
    pipeline: UpdatePipeline,
    losses: list[Tensor],
    values: list[float],
    reps: list[Tensor],
    heads: list[Tensor],
    reached: np.ndarray,
    readers: list[_Reader] | None,
    params: list[Tensor],
    scale: float | None,
    batch: str,
) -> StepInfo:
    method, needs = pipeline.method, pipeline.method.needs
    rep_jacobian, head_jacobian = _task_gradients(losses, reps, heads, reached, readers)
    stats_jacobian = rep_jacobian if batch == "samples" else _summed_over_batch(rep_jacobian, reps)

    gramian = squared_norms = None
    if needs >= Needs.GRAMIAN:
        gramian = stats_jacobian.gramian_rows()
        total = sum(map(sum, gramian))
    else:
        squared_norms = stats_jacobian.squared_norm_values()
        total = sum(squared_norms)
    if not math.isfinite(total) or not all_finite([head_jacobian.dense]):
        bad = sorted({*rep_jacobian.nonfinite_tasks(), *head_jacobian.nonfinite_tasks()})
        if bad:
            if scale is None:
                pipeline._refuse(bad, "gradient")
            # An overflow under a GradScaler: left in .grad, for the scaler to skip the step.
            ones = [1.0] * len(values)
            _write(
                pipeline, reps, heads, params, rep_jacobian, head_jacobian, ones, None, None, scale
            )
            return method.info_class(values, gramian=gramian, skipped=True, nonfinite_tasks=bad)
    if scale is not None:  # the method and the info see the unscaled gradients
        if gramian is not None:
            gramian = [[g / scale / scale for g in row] for row in gramian]
        if squared_norms is not None:
            squared_norms = [s / scale / scale for s in squared_norms]
        if needs == Needs.JACOBIAN:
            rep_jacobian.dense.div_(scale)

    stats = TaskStats(
        losses=tuple(values),
        gramian_rows=gramian,
        squared_norms=None if squared_norms is None else tuple(squared_norms),
        jacobian=rep_jacobian if needs == Needs.JACOBIAN else None,
    )
    with pipeline._rollback_on_error():
        decision = method.decide(stats)
        weights = pipeline._weights(decision, len(values))
        direction = decision.direction
        if direction is not None and scale is not None:
            direction = [d * scale for d in direction]
        finite = _write(
            pipeline,
            reps,
            heads,
            params,
            rep_jacobian,
            head_jacobian,
            weights,
            direction,
            decision,
            scale,
        )
        if not finite:  # under a GradScaler: left in .grad for the scaler to skip the step
            return method.info_class(
                values, weights=weights, gramian=gramian, squared_norms=squared_norms, skipped=True
            )
    return pipeline._commit(decision, weights, values, gramian, squared_norms)


def _summed_over_batch(jacobian: TaskJacobian, reps: list[Tensor]) -> TaskJacobian:
    """Each task's representation gradient summed over the batch (first) dimension."""
    num_tasks = jacobian.num_tasks
    blocks = jacobian.dense.split(jacobian.numels, dim=1)
    summed = [
        block.reshape(num_tasks, z.shape[0], -1).sum(1)
        for block, z in zip(blocks, reps, strict=True)
    ]
    return TaskJacobian(torch.cat(summed, dim=1), None, [b.shape[1] for b in summed])


def _heads(
    losses: list[Tensor], reps: list[Tensor], params: list[Tensor]
) -> tuple[list[Tensor], np.ndarray, list[_Reader] | None]:
    """The optimized parameters the losses reach without passing through the representation,
    which task reaches which (``[T, n_heads]`` bool), and the autograd nodes that read the
    representation, each with the one task whose loss reaches it (``None`` where a node
    serves several tasks or a loss is the representation itself).

    Walks the losses' graph and stops at the representation's edges, so only the heads are
    visited. Refuses a representation that no loss reads and a loss that does not read it.
    """
    stops = {(z.grad_fn, z.output_nr): k for k, z in enumerate(reps)}
    walks = [_walk(loss, stops) for loss in losses]
    used = set().union(*(walk.hit for walk in walks))
    unused = [k for k in range(len(reps)) if k not in used]
    if unused:
        which = "representation" if len(reps) == 1 else f"representation{unused}"
        raise ValueError(
            f"{which} is read by no loss (not in the losses' graph): pass the encoder's "
            "output that the heads compute the losses from"
        )
    for i, walk in enumerate(walks):
        if not walk.hit:
            raise ValueError(
                f"the loss of task {i} does not depend on the representation, so its "
                "gradient there is zero and the method would decide from nothing: pass the "
                "tensor every head reads (or leave this loss out, or leave representation= out)"
            )
    around = set().union(*(walk.leaves for walk in walks))
    heads = [p for p in params if id(p) in around]
    ids = [id(p) for p in heads]
    reached = np.zeros((len(losses), len(heads)), dtype=bool)
    for i, walk in enumerate(walks):
        reached[i] = [k in walk.leaves for k in ids]
    return heads, reached, _task_readers(walks, reached)


class _Reader(NamedTuple):
    """An autograd node that reads the representation: the task whose loss alone reaches it,
    and the node's inputs that are representation tensors (input position, tensor index)."""

    node: Any
    task: int
    inputs: tuple[tuple[int, int], ...]


def _task_readers(walks: list[_Walk], reached: np.ndarray) -> list[_Reader] | None:
    """The representation's readers, each owned by one task; ``None`` unless one backward
    pass of every loss can give each task's representation gradient apart: every reader and
    every head is reached by a single task, and no loss is a representation itself."""
    if reached.sum(axis=0).max(initial=0) > 1:
        return None
    readers: list[_Reader] = []
    owner: dict[Any, int] = {}
    for task, walk in enumerate(walks):
        if not walk.readers:  # the loss is a representation tensor: no node to listen to
            return None
        for node, inputs in walk.readers.items():
            if owner.setdefault(node, task) != task:
                return None
            readers.append(_Reader(node, task, inputs))
    return readers


class _Walk(NamedTuple):
    hit: set[int]  # the representation tensors the loss reads
    leaves: set[int]  # ids of the leaves it reaches around them
    readers: dict[Any, tuple[tuple[int, int], ...]]  # node -> (input position, tensor index)


def _walk(loss: Tensor, stops: dict[tuple[Any, int], int]) -> _Walk:
    """Where ``loss``'s graph meets the representation, and what it reaches around it."""
    hit: set[int] = set()
    leaves: set[int] = set()
    readers: dict[Any, tuple[tuple[int, int], ...]] = {}
    root = (loss.grad_fn, loss.output_nr)
    if root in stops:
        return _Walk({stops[root]}, leaves, readers)
    stack, seen = [loss.grad_fn], {loss.grad_fn}
    while stack:
        node = stack.pop()
        if type(node) is _AccumulateGrad:
            leaves.add(id(node.variable))
            continue
        for position, edge in enumerate(node.next_functions):
            next_node = edge[0]
            if next_node is None:
                continue
            if edge in stops:
                hit.add(stops[edge])
                readers[node] = (*readers.get(node, ()), (position, stops[edge]))
            elif next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return _Walk(hit, leaves, readers)


def _task_gradients(
    losses: list[Tensor],
    reps: list[Tensor],
    heads: list[Tensor],
    reached: np.ndarray,
    readers: list[_Reader] | None,
) -> tuple[TaskJacobian, TaskJacobian]:
    """Every task's gradient of the representation and of the heads, through the heads only
    (the encoder is no input, so autograd leaves it alone)."""
    dtypes = {p.dtype for p in heads}
    if len(dtypes) > 1:
        raise ValueError(
            f"the heads' parameters must share one dtype, found {sorted(map(str, dtypes))}"
        )
    first = reps[0]
    rep_numels, head_numels = [z.numel() for z in reps], [p.numel() for p in heads]
    rep_matrix = first.new_zeros(len(losses), sum(rep_numels))
    head_dtype = heads[0].dtype if heads else first.dtype
    head_matrix = first.new_zeros(len(losses), sum(head_numels), dtype=head_dtype)
    rep_rows = [row.split(rep_numels) for row in rep_matrix]
    head_rows = [row.split(head_numels) for row in head_matrix]
    if readers is None:
        _per_task_backward(losses, reps, heads, reached, rep_rows, head_rows)
    else:
        _one_backward(losses, reps, heads, reached, readers, rep_rows, head_rows)
    return (
        TaskJacobian(rep_matrix, None, rep_numels),
        TaskJacobian(head_matrix, reached, head_numels),
    )


def _one_backward(
    losses: list[Tensor],
    reps: list[Tensor],
    heads: list[Tensor],
    reached: np.ndarray,
    readers: list[_Reader],
    rep_rows: list[tuple[Tensor, ...]],
    head_rows: list[tuple[Tensor, ...]],
) -> None:
    """All tasks in one backward pass of ``sum_i L_i`` through the heads.

    Each node that reads the representation serves one task alone (``_task_readers``), so the
    gradient it sends to the representation is that task's: a hook on the node copies it out
    before autograd adds the tasks together. Each head is reached by one task, so its summed
    gradient is that task's. The same kernels run on the same inputs as one call per task.
    """

    def listen(reader: _Reader) -> Any:
        rows = rep_rows[reader.task]

        def hook(grad_inputs: tuple[Tensor | None, ...], _: Any) -> None:
            for position, k in reader.inputs:
                grad = grad_inputs[position]
                if grad is not None:
                    rows[k].add_(grad.reshape(-1))

        return hook

    handles = [reader.node.register_hook(listen(reader)) for reader in readers]
    try:
        grads = torch.autograd.grad(losses, [*reps, *heads], retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    owners = reached.argmax(axis=0).tolist()  # each head's one task
    head_grads = grads[len(reps) :]
    hit = [k for k, g in enumerate(head_grads) if g is not None]
    if hit:
        torch._foreach_copy_(
            [head_rows[owners[k]][k] for k in hit], [head_grads[k].reshape(-1) for k in hit]
        )


def _per_task_backward(
    losses: list[Tensor],
    reps: list[Tensor],
    heads: list[Tensor],
    reached: np.ndarray,
    rep_rows: list[tuple[Tensor, ...]],
    head_rows: list[tuple[Tensor, ...]],
) -> None:
    """One autograd call per task: where a node reading the representation or a head serves
    several tasks, their gradients meet inside the heads and only separate calls tell them
    apart."""
    for i, loss in enumerate(losses):
        # Only the heads this task's graph reaches (known from the walk): with one head per
        # task, autograd is not asked about the other T - 1 heads at every call.
        own = np.flatnonzero(reached[i]).tolist()
        inputs = [*reps, *(heads[k] for k in own)]
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows = [*rep_rows[i], *(head_rows[i][k] for k in own)]
        hit = [k for k, g in enumerate(grads) if g is not None]
        torch._foreach_copy_([rows[k] for k in hit], [grads[k].reshape(-1) for k in hit])


def _write(
    pipeline: UpdatePipeline,
    reps: list[Tensor],
    heads: list[Tensor],
    params: list[Tensor],
    rep_jacobian: TaskJacobian,
    head_jacobian: TaskJacobian,
    weights: list[float],
    direction: list[Tensor] | None,
    decision: Any,
    scale: float | None,
) -> bool:
    """Backpropagate the combined representation gradient through the encoder (one pass),
    combine the heads' gradients, check and write both; ``False`` when the result is not
    finite (under a GradScaler, for the scaler to skip; otherwise refused before writing)."""
    combined_rep = direction if direction is not None else rep_jacobian.combine(weights)
    head_ids = {id(p) for p in heads}
    encoder = [p for p in params if id(p) not in head_ids]
    # The heads are asked too: one that the representation also depends on (a weight tied
    # between encoder and head) would otherwise lose the encoder's part of its gradient.
    found = torch.autograd.grad(
        reps,
        [*encoder, *heads],
        grad_outputs=[g.view_as(z) for g, z in zip(combined_rep, reps, strict=True)],
        allow_unused=True,
    )
    tied = [k for k, g in enumerate(found[len(encoder) :]) if g is not None]
    if tied:
        shapes = ", ".join(str(tuple(heads[k].shape)) for k in tied)
        raise ValueError(
            f"parameter(s) of shape {shapes} reach the losses both through the representation "
            "and around it (a weight tied between encoder and head, or a skip connection past "
            "the representation?): mark every tensor the heads read from the encoder as "
            "representation, or leave representation= out for the exact mode"
        )
    found = found[: len(encoder)]
    targets = [p for p, g in zip(encoder, found, strict=True) if g is not None]
    grads = [g.reshape(-1) for g in found if g is not None]
    if heads:
        reached = head_jacobian.reached
        shared = pipeline._shared_ids
        mask = (
            reached.all(axis=0)
            if shared is None
            else np.array([id(p) in shared for p in heads], dtype=bool)
        )
        rule = pipeline.method.unshared
        head_weights = (
            weights if rule == "weights" else _per_parameter_weights(weights, mask, reached, rule)
        )
        kept = reached.any(axis=0)
        for p, g, k in zip(heads, head_jacobian.combine(head_weights), kept, strict=True):
            if k:  # a head no task reaches keeps its .grad, as after backward()
                targets.append(p)
                grads.append(g)
    if not targets:
        raise ValueError(
            "no parameter of the wrapped optimizer is reached by any loss: the losses do not "
            "depend on the parameters being optimized"
        )
    finite = all_finite(grads)
    if not finite and scale is None:
        pipeline._refuse_weighted()
    pipeline._write(targets, grads, decision, scale)
    return finite
