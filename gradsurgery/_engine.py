"""Former home of the engines; re-exports their names while their callers move.

The Jacobian type lives in :mod:`gradsurgery._jacobian`, the default engine and the graph walk
in :mod:`gradsurgery._autograd`, the batch-partition engine in :mod:`gradsurgery._partition`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._autograd import (
    AutogradEngine,
    graph_leaves,
    task_gradients,
    task_jacobian,
    unique_tensors,
)
from ._autograd import unique_tensors as _unique
from ._jacobian import Engine, FactoredGradients, TaskJacobian, outer_sums

__all__ = [
    "AutogradEngine",
    "Engine",
    "FactoredGradients",
    "TaskJacobian",
    "_unique",
    "accumulate_grads",
    "as_parameter_list",
    "graph_leaves",
    "outer_sums",
    "task_gradients",
    "task_jacobian",
]


def as_parameter_list(parameters: Iterable[Tensor] | torch.nn.Module, what: str) -> list[Tensor]:
    """Accept a module or an iterable of tensors; return the tensors that require grad."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = list(parameters)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must hold tensors, got a {type(p).__name__}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{what} is empty: no tensor in it requires grad")
    return unique_tensors(params)


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add ``grads[k]`` (flattened) into ``params[k].grad``, as ``backward`` would.

    The tensors in ``grads`` must be fresh ones the caller gives away: empty ``.grad`` slots
    take them (as views) rather than copies.
    """
    existing_params, existing_grads = [], []
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.view_as(p)
        else:
            existing_params.append(p.grad)
            existing_grads.append(g.view_as(p))
    if existing_params:
        torch._foreach_add_(existing_params, existing_grads)
