"""Per-task gradients: the engine every method stands on.

The generic path asks autograd for each task's gradient in turn (the graph is kept between
tasks), writes them into the rows of one ``[T, P]`` matrix, and remembers which parameters
each task's graph reaches. Methods then work on that matrix or on its Gramian.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._validation import check_losses


@dataclass(frozen=True)
class TaskJacobian:
    """Per-task gradients of a list of parameters, flattened and stacked.

    Attributes
    ----------
    matrix : Tensor
        ``[T, P]``: row ``i`` is task ``i``'s gradient, zeros where the task does not reach.
    reached : numpy.ndarray
        ``[T, n_params]`` bool: whether task ``i``'s autograd graph reaches parameter ``k``.
    """

    matrix: Tensor
    reached: np.ndarray


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
    return _unique(params)


def task_jacobian(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> TaskJacobian:
    """Per-task gradients of ``params`` with one autograd call per task.

    The graph is retained between tasks and freed after the last one unless ``retain_graph``.
    """
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError(
            "all parameters must share one dtype and device for the per-task gradient matrix; "
            f"found {sorted({(str(p.dtype), str(p.device)) for p in params})}"
        )
    numels = [p.numel() for p in params]
    matrix = torch.zeros(len(losses), sum(numels), dtype=first.dtype, device=first.device)
    reached = np.zeros((len(losses), len(params)), dtype=bool)
    for i, loss in enumerate(losses):
        keep = retain_graph or i < len(losses) - 1
        grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        rows = matrix[i].split(numels)
        hit = [k for k, g in enumerate(grads) if g is not None]
        if hit:
            torch._foreach_copy_([rows[k] for k in hit], [grads[k].reshape(-1) for k in hit])
            reached[i, hit] = True
    return TaskJacobian(matrix, reached)


class AutogradEngine:
    """The default engine: one autograd call per task (see :func:`task_jacobian`)."""

    single_backward = False

    def jacobian(
        self, losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> TaskJacobian:
        return task_jacobian(losses, params, retain_graph=retain_graph)


def task_gradients(
    losses: Sequence[Tensor],
    params: Iterable[Tensor] | torch.nn.Module,
    *,
    retain_graph: bool = False,
) -> Tensor:
    """Per-task gradients of ``params``, one flattened row per task.

    Parameters
    ----------
    losses : sequence of Tensor
        ``T`` scalar losses.
    params : module or iterable of Tensor
        The parameters to differentiate; those that do not require grad are left out.
    retain_graph : bool
        Keep the autograd graph after the last task (default ``False``).

    Returns
    -------
    Tensor
        ``[T, P]`` matrix, ``P`` the total number of elements of ``params``. A task whose graph
        does not reach a parameter has zeros there.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery import task_gradients
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> task_gradients([(w**2).sum(), 3 * w[0]], [w])
    tensor([[2., 4.],
            [3., 0.]])
    """
    losses = check_losses(losses)
    param_list = as_parameter_list(params, "params")
    return task_jacobian(losses, param_list, retain_graph=retain_graph).matrix


def graph_leaves(roots: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors (parameters) reached by the autograd graphs of ``roots``, in a fixed order."""
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = []
    for root in roots:
        if root.grad_fn is None:
            if root.requires_grad:
                leaves.append(root)
        else:
            stack.append(root.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return _unique(leaves)


def accumulate_grads(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add ``flat`` (shape ``[P]``) into ``.grad`` of ``params``, as ``backward`` would.

    ``flat`` must be a fresh tensor the caller gives away: empty ``.grad`` slots become views
    of it rather than copies.
    """
    views = [
        g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
    ]
    existing = [k for k, p in enumerate(params) if p.grad is not None]
    if existing:
        torch._foreach_add_([params[k].grad for k in existing], [views[k] for k in existing])
    for p, view in zip(params, views, strict=True):
        if p.grad is None:
            p.grad = view


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
