"""Which tasks reach each fast-path layer, from the autograd graph, as the default engine sees it.

A task reaches a parameter when its loss's graph leads to it, whatever the gradient's value
(the default engine's rule): with per-task heads applied to the whole batch, each loss reads
its own head's output only, so a head is reached by its own task although the single backward
writes (zero) gradients for every task. In the usual model every loss reads the same recorded
outputs: the walk goes down from the losses only to the first recorded outputs and finds
each reached by every task; only otherwise does it go on through the layers.

A parameter that only one task's loss reaches (a per-task head on its task's rows, any layer)
needs no attribution by rows: the single backward pass's gradient of it is that task's
gradient, and every other task's is zero. :func:`sole_tasks` finds those parameters by a walk
over the whole graph, layers included, so that no use of a parameter is missed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .recording import Call

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad  # a leaf's node in the graph


def task_reach(
    losses: Sequence[Tensor], calls: dict[nn.Module, list[Call]], fast: Sequence[nn.Module]
) -> list[set[nn.Module]] | None:
    """Per task, the ``fast`` layers its loss reaches; ``None`` when every task reaches the same.

    ``None`` is the usual case and costs one walk over the nodes between the losses and the
    first recorded outputs.
    """
    layer_of = {c.output.grad_fn: module for module in fast for c in calls[module]}
    layer_of.pop(None, None)
    everyone = (1 << len(losses)) - 1
    masks = _task_masks(losses, layer_of, None)
    if all(masks[node] == everyone for node in layer_of.keys() & masks.keys()):
        return None  # the layers below the first recorded outputs are reached by all alike
    inputs = {c.output.grad_fn: c.input.grad_fn for module in fast for c in calls[module]}
    masks = _task_masks(losses, layer_of, inputs)
    reach: list[set[nn.Module]] = [set() for _ in losses]
    for node, module in layer_of.items():
        mask = masks.get(node, 0)
        for t, layers in enumerate(reach):
            if mask >> t & 1:
                layers.add(module)
    return reach


def sole_tasks(
    losses: Sequence[Tensor], params: Sequence[Tensor], columns: Sequence[int]
) -> dict[int, int]:
    """The ``columns`` (indices into ``params``) whose parameter one task's loss alone
    reaches, and that task.

    A leaf's node (``AccumulateGrad``) is where autograd adds up every use of the leaf, so
    its tasks are the tasks of every use. A column the walk cannot place (a parameter that is
    not a leaf, or that no loss reaches) is left out: it keeps the per-task path.
    """
    masks = _task_masks(losses, {}, None)
    leaves = {
        id(node.variable): mask for node, mask in masks.items() if type(node) is _ACCUMULATE_GRAD
    }
    sole = {}
    for k in columns:
        mask = leaves.get(id(params[k]), 0)
        if mask and not mask & (mask - 1):  # exactly one bit: one task
            sole[k] = mask.bit_length() - 1
    return sole


def _task_masks(
    losses: Sequence[Tensor], layer_of: dict[Any, nn.Module], through: dict[Any, Any] | None
) -> dict[Any, int]:
    """Per autograd node, the tasks (bit ``t`` for task ``t``) whose loss's graph reaches it.

    Without ``through`` the walk stops at the recorded outputs (the keys of ``layer_of``);
    with it, it goes on from a recorded output to its call's input. Nodes are expanded in
    decreasing creation order (a node is created after its inputs), so each one usually
    once with all its tasks; a node reached again with new tasks is expanded again for those.
    """
    masks: dict[Any, int] = {}
    heap: list[tuple[int, int, Any]] = []
    push, pop = heapq.heappush, heapq.heappop
    for t, loss in enumerate(losses):
        node = loss.grad_fn
        if node is not None:
            if node not in masks:
                push(heap, (-node._sequence_nr(), id(node), node))
            masks[node] = masks.get(node, 0) | 1 << t
    expanded: dict[Any, int] = {}
    while heap:  # every step walks it: keep the loop tight
        node = pop(heap)[2]
        mask = masks[node]
        new = mask & ~expanded.get(node, 0)
        if not new:
            continue
        expanded[node] = mask
        if node in layer_of:
            if through is None:
                continue
            children: Any = ((through[node], 0),)
        else:
            children = node.next_functions
        for child, _ in children:
            if child is not None:
                old = masks.get(child, 0)
                if new & ~old:
                    masks[child] = old | new
                    push(heap, (-child._sequence_nr(), id(child), child))
    return masks
