"""Which tasks reach each fast-path layer, from the autograd graph, as the default engine sees it.

A task reaches a parameter when its loss's graph leads to it, whatever the gradient's value
(the default engine's rule): with per-task heads applied to the whole batch, each loss reads
its own head's output only, so a head is reached by its own task although the single backward
writes (zero) gradients for every task. The usual model has every loss read the same
recorded outputs, so the walk from each loss stops at the first recorded outputs it meets and
compares those entry points; only when they differ is the graph between layers walked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .recording import Call


def task_reach(
    losses: Sequence[Tensor], calls: dict[nn.Module, list[Call]], fast: Sequence[nn.Module]
) -> list[set[nn.Module]] | None:
    """Per task, the ``fast`` layers its loss reaches; ``None`` when all tasks reach the same.

    ``None`` is the usual case and costs one short walk per loss (down to the first recorded
    outputs).
    """
    layer_of = {c.output.grad_fn: module for module in fast for c in calls[module]}
    layer_of.pop(None, None)
    entries = [_entries([loss.grad_fn], layer_of) for loss in losses]
    if all(e == entries[0] for e in entries[1:]):
        return None
    below: dict[Any, frozenset[Any]] = {}  # recorded output node -> the ones under its call
    inputs = {c.output.grad_fn: c.input.grad_fn for module in fast for c in calls[module]}
    reach = []
    for entry in entries:
        nodes, stack = set(entry), list(entry)
        while stack:
            node = stack.pop()
            if node not in below:
                below[node] = frozenset(_entries([inputs[node]], layer_of))
            for child in below[node] - nodes:
                nodes.add(child)
                stack.append(child)
        reach.append({layer_of[node] for node in nodes})
    return reach


def _entries(roots: list[Any], layer_of: dict[Any, nn.Module]) -> frozenset[Any]:
    """The recorded output nodes first met on the walks down from ``roots``."""
    found, seen = set(), set()
    stack = [root for root in roots if root is not None]
    while stack:
        node = stack.pop()
        if node in layer_of:
            found.add(node)
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return frozenset(found)
