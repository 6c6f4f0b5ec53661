"""Which tasks reach each fast-path layer, from the autograd graph, as the default engine sees it.

A task reaches a parameter when its loss's graph leads to it, whatever the gradient's value
(the default engine's rule): with per-task heads applied to the whole batch, each loss reads
its own head's output only, so a head is reached by its own task although the single backward
writes (zero) gradients for every task. In the usual model every loss reads the same recorded
outputs: the walk goes down from the losses only to the first recorded outputs and finds
each reached by every task; only otherwise does it go on through the layers.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .recording import Call


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
