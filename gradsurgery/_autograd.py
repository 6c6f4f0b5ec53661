"""The default engine: one autograd call per task, and the walk over an autograd graph.

Each task's gradient is asked of autograd in turn (the graph is kept between tasks), written
into a row of one ``[T, P]`` matrix, and the parameters each task's graph reaches are
remembered. It works for any model, compiled or not, at the cost of ``T`` backward passes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._jacobian import TaskJacobian
from ._validation import as_parameter_list, check_losses


def task_jacobian(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> TaskJacobian:
    """Per-task gradients of ``params`` with one autograd call per task.

    The graph is retained between tasks and freed after the last one unless ``retain_graph``.
    """
    _check_jacobian_params(params)
    first = params[0]
    numels = [p.numel() for p in params]
    matrix = torch.zeros(len(losses), sum(numels), dtype=first.dtype, device=first.device)
    reached = np.zeros((len(losses), len(params)), dtype=bool)
    for i, loss in enumerate(losses):
        keep = retain_graph or i < len(losses) - 1
        grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        rows = matrix[i].split(numels)
        hit = [k for k, g in enumerate(grads) if g is not None]
        if hit:
            try:
                flat = [grads[k].reshape(-1) for k in hit]
            except RuntimeError:
                _refuse_sparse(params, grads)
                raise
            torch._foreach_copy_([rows[k] for k in hit], flat)
            reached[i, hit] = True
    return TaskJacobian(matrix, reached, numels)


def batched_task_jacobian(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> TaskJacobian | None:
    """Per-task gradients of ``params`` from one vectorized backward pass.

    The ``T`` cotangents (the rows of the identity) go through the graph together
    (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over the backward formulas):
    one pass whose every operation handles ``T`` gradients at once, instead of ``T`` passes.
    Returns ``None`` when some operation of the graph has no batched backward (a custom
    ``autograd.Function`` without a vmap rule, some fused kernels): the graph is kept for the
    caller's per-task fallback.
    """
    _check_jacobian_params(params)
    stacked = torch.stack(list(losses))
    cotangents = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    try:
        # The graph is kept even after success when asked, and always kept on failure:
        # vmap may fail halfway through the pass, after autograd freed some of its buffers.
        grads = torch.autograd.grad(
            stacked,
            params,
            cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError as error:
        if "sparse" in str(error):
            raise
        return None
    numels = [p.numel() for p in params]
    first = params[0]
    matrix = torch.zeros(len(losses), sum(numels), dtype=first.dtype, device=first.device)
    blocks = matrix.split(numels, dim=1)
    hit = [k for k, g in enumerate(grads) if g is not None]
    if hit:
        torch._foreach_copy_(
            [blocks[k] for k in hit], [grads[k].reshape(len(losses), -1) for k in hit]
        )
    # Which parameters each task reaches is a property of its graph, not of its values (a
    # reached gradient may be zero): one walk per task.
    positions = {id(p): k for k, p in enumerate(params)}
    reached = np.zeros((len(losses), len(params)), dtype=bool)
    for i, loss in enumerate(losses):
        reached[i, [positions[id(q)] for q in graph_leaves([loss]) if id(q) in positions]] = True
    return TaskJacobian(matrix, reached, numels)


def _check_jacobian_params(params: Sequence[Tensor]) -> None:
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError(
            "all parameters must share one dtype and device for the per-task gradient matrix; "
            f"found {sorted({(str(p.dtype), str(p.device)) for p in params})}"
        )
    if first.is_complex():
        raise TypeError(
            f"complex parameters ({first.dtype}) are not supported: the methods compare task "
            "gradients by real dot products; keep the real and imaginary parts as two real "
            "parameters"
        )


def _refuse_sparse(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    sparse = [k for k, g in enumerate(grads) if g is not None and g.layout != torch.strided]
    if sparse:
        shapes = ", ".join(f"{k} {tuple(params[k].shape)}" for k in sparse)
        raise TypeError(
            f"parameter(s) {shapes} got a sparse gradient (nn.Embedding or nn.EmbeddingBag "
            "with sparse=True): per-task gradient methods combine dense gradients; build the "
            "layer with sparse=False"
        )


class AutogradEngine:
    """The default engine: one autograd call per task (see :func:`task_jacobian`).

    Parameters
    ----------
    batched : bool
        Take the ``T`` task gradients in one vectorized backward pass instead
        (:func:`batched_task_jacobian`); a graph with an operation vmap cannot batch falls
        back to one call per task, and the engine stops trying from then on.
    """

    single_backward = False

    def __init__(self, batched: bool = False) -> None:
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be True or False, got {batched!r}")
        self.batched = batched
        self.fell_back = False  # set when a graph could not be batched

    def jacobian(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        reuse: bool = False,
    ) -> TaskJacobian:
        """Per-task gradients of ``params``. ``reuse`` is accepted for the engines' common
        signature: with T backward passes, an allocation per step is not worth saving."""
        del reuse
        if self.batched and not self.fell_back and len(losses) > 1:
            jacobian = batched_task_jacobian(losses, params, retain_graph=retain_graph)
            if jacobian is not None:
                return jacobian
            self.fell_back = True  # a graph vmap cannot batch: the same model will not change
        return task_jacobian(losses, params, retain_graph=retain_graph)

    def reached_jacobian(
        self, losses: Sequence[Tensor], leading: Sequence[Tensor], *, reuse: bool = False
    ) -> tuple[list[Tensor], TaskJacobian]:
        """Per-task gradients of ``leading``, then of every other parameter the losses reach."""
        params = unique_tensors([*leading, *graph_leaves(losses)])
        return params, self.jacobian(losses, params, reuse=reuse)

    def __repr__(self) -> str:
        return f"AutogradEngine(batched={self.batched})"


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


def graph_leaves(
    roots: Sequence[Tensor],
    bypass: dict[torch.autograd.graph.Node, Any] | None = None,
    watch: Collection[type] = (),
    found: list[Any] | None = None,
) -> list[Tensor]:
    """Leaf tensors (parameters) reached by the autograd graphs of ``roots``, in a fixed order.

    ``bypass`` maps nodes to the node the walk goes on from instead (``None``: stop there).
    Nodes of the types in ``watch`` that the walk visits are appended to ``found``.
    """
    bypass = bypass or {}
    leaves = [root for root in roots if root.grad_fn is None and root.requires_grad]
    stack = [_follow(root.grad_fn, bypass) for root in roots if root.grad_fn is not None]
    seen = set(stack)  # autograd nodes: their Python objects live as long as the graph
    while stack:  # GradNorm walks the graph every step: keep the loop tight
        node = stack.pop()
        if node is None:
            continue
        kind = type(node)
        if kind is _AccumulateGrad:  # a leaf's node; it has no next functions
            leaves.append(node.variable)
            continue
        if kind in watch:
            found.append(node)  # type: ignore[union-attr]
        for next_node, _ in node.next_functions:
            if next_node in bypass:
                next_node = _follow(next_node, bypass)
            if next_node is not None and next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return unique_tensors(leaves)


def reaches_any(root: Tensor, wanted: Collection[int]) -> bool:
    """Whether the graph of ``root`` leads to a leaf whose ``id`` is in ``wanted``.

    Stops at the first such leaf: a loss usually finds one a few nodes down (its head's bias),
    so the check costs microseconds where a whole walk of the graph costs more.
    """
    node = root.grad_fn
    if node is None:
        return id(root) in wanted
    stack, seen = [node], {node}
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None or child in seen:
                continue
            if type(child) is _AccumulateGrad:
                if id(child.variable) in wanted:
                    return True
                continue
            seen.add(child)
            stack.append(child)
    return False


def seeded_grad(
    outputs: Sequence[Tensor], seeds: Sequence[Tensor], inputs: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)``, straight from the
    engine for plain tensors.

    ``torch.autograd.grad`` checks every seed's shape and dtype and every input in Python:
    about a tenth of a small model's step. The pipeline makes its seeds itself (0-dim, each
    of its loss's dtype and device) and its inputs are parameters, so those checks cannot
    fail; tensor subclasses and torch function modes, which need torch's dispatch, take
    ``torch.autograd.grad``.
    """
    if (
        _RUN_BACKWARD is None
        or torch._C._is_torch_function_mode_enabled()
        or not all(type(t) in _PLAIN for t in outputs)
        or not all(type(t) in _PLAIN for t in inputs)
    ):
        return torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
    return _RUN_BACKWARD(tuple(outputs), tuple(seeds), False, False, tuple(inputs), True, False)


def _follow(node: Any, bypass: dict[Any, Any]) -> Any:
    for _ in range(len(bypass) + 1):  # chains: a layer called on its own output
        if node not in bypass:
            return node
        node = bypass[node]
    # Only tensors that share one autograd node (outputs of one compiled graph) can loop.
    raise RuntimeError(
        "the graph walk's bypass has a cycle: recorded outputs share one autograd node"
    )


_AccumulateGrad = torch._C._functions.AccumulateGrad
# The C++ engine's entry point behind torch.autograd.grad (torch >= 2.3); None before.
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)
_PLAIN = (Tensor, torch.nn.Parameter)


def unique_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` without repeats (by identity), in their first order."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
