"""Per-task gradients: the engine every method stands on.

The generic path asks autograd for each task's gradient in turn (the graph is kept between
tasks), writes them into the rows of one ``[T, P]`` matrix, and remembers which parameters
each task's graph reaches. Methods then only ask a :class:`TaskJacobian` for Gramians, weighted
combinations and a finiteness check, so an engine may also keep some parameters' gradients in
factored form (:class:`FactoredGradients`) and never build their ``[T, P]`` block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from ._validation import check_losses, nonfinite_tasks

# Below this many input features, CPU BLAS computes ``g^T x`` (a thin [out, in] result) several
# times slower than ``x^T g`` plus a transposed copy (the study's 8 -> 256 first layer among
# them). Measured on the CPU only, so other devices keep the direct product.
_THIN_INPUT = 16


def outer_sums(g: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``g^T x`` over the last two dimensions: ``[rows, out]`` and ``[rows, in]`` tensors, or
    batches of them (``[B, rows, out]``, ``[B, rows, in]``)."""
    # mm / bmm, not matmul: for batches, matmul adds four expand / reshape calls per product.
    product = torch.mm if g.dim() == 2 else torch.bmm
    if x.shape[-1] >= _THIN_INPUT or not x.is_cpu:
        return product(g.transpose(-1, -2), x, out=out)
    transposed = product(x.transpose(-1, -2), g).transpose(-1, -2)
    return transposed if out is None else out.copy_(transposed)


@dataclass(frozen=True)
class FactoredGradients:
    """Per-task gradients of one ``nn.Linear`` weight, kept as the factors autograd gives.

    Task ``t``'s gradient is ``D_t^T X_t``: the sum over its rows of the outer product of the
    output gradient and the input. Kept this way it costs ``M (in + out)`` numbers instead of
    ``T * in * out``, and both things the methods need come without the ``[T, in * out]``
    matrix: the Gramian, ``<D_s^T X_s, D_t^T X_t>`` being the sum of ``(X X^T) * (D D^T)`` over
    the ``(s, t)`` block (the "ghost norm" trick: Goodfellow 2015, Li et al. 2022), and any
    combination ``sum_t w_t D_t^T X_t = D^T diag(w_row) X``, one matmul like the plain weight
    gradient.

    Attributes
    ----------
    inputs : Tensor
        ``[M, in]`` layer inputs, one row per sample (and per position of extra dimensions).
    output_grads : Tensor
        ``[M, out]`` gradients of the summed loss with respect to the layer's outputs.
    row_tasks : Tensor
        ``[M]`` task index of every row.
    num_tasks : int
        ``T``.
    """

    inputs: Tensor
    output_grads: Tensor
    row_tasks: Tensor
    num_tasks: int

    def gramian(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[T, T]`` dot products of the tasks' weight gradients (in ``dtype`` if given)."""
        x, d = self.inputs, self.output_grads
        if dtype is not None:
            x, d = x.to(dtype), d.to(dtype)
        kernel = (x @ x.T).mul_(d @ d.T)  # <d_a x_a^T, d_b x_b^T> = (x_a . x_b)(d_a . d_b)
        one_hot = nnf.one_hot(self.row_tasks, self.num_tasks).to(kernel.dtype)
        return one_hot.T @ kernel @ one_hot

    def combine(self, weights: Tensor) -> Tensor:
        """``sum_t weights[t] D_t^T X_t``, flattened to ``[out * in]``."""
        row_weights = weights.to(self.output_grads)[self.row_tasks]
        return outer_sums(self.output_grads * row_weights[:, None], self.inputs).reshape(-1)

    def dense(self) -> Tensor:
        """The ``[T, out * in]`` per-task gradients: the memory the factored form avoids."""
        # Each task from its own rows only: a NaN in one task's rows stays in that task.
        return torch.stack(
            [
                outer_sums(self.output_grads[rows], self.inputs[rows]).reshape(-1)
                for rows in (self.row_tasks == t for t in range(self.num_tasks))
            ]
        )


class TaskJacobian:
    """Per-task gradients of a list of parameters.

    Most parameters are stored densely, as the columns of one ``[T, P_dense]`` matrix in
    parameter order. Under :class:`BatchPartitionEngine` a large ``nn.Linear`` weight may be
    kept as :class:`FactoredGradients` instead. The methods only need the Gramian of some
    parameters, weighted combinations of the task gradients and a finiteness check: all three
    are computed here without assembling the ``[T, P]`` matrix.

    Parameters
    ----------
    dense : Tensor
        ``[T, P_dense]``: the dense parameters' per-task gradients, zeros where a task does not
        reach.
    reached : numpy.ndarray or None
        ``[T, n_params]`` bool: whether task ``i``'s autograd graph reaches parameter ``k``;
        ``None`` when every task reaches every parameter.
    numels : sequence of int
        Number of elements of every parameter.
    factored : dict, optional
        ``{parameter index: FactoredGradients}`` for the parameters left out of ``dense``.
    """

    def __init__(
        self,
        dense: Tensor,
        reached: np.ndarray | None,
        numels: Sequence[int],
        factored: dict[int, FactoredGradients] | None = None,
    ) -> None:
        self.dense = dense
        self._reached = reached
        # The usual case, asked about at every step: a bool rather than a NumPy reduction.
        self.all_reached = reached is None or bool(reached.all())
        self.numels = list(numels)
        self.factored = factored or {}
        self.num_tasks = dense.shape[0]
        self._dense_numels = (
            [n for k, n in enumerate(self.numels) if k not in self.factored]
            if self.factored
            else self.numels
        )

    @property
    def reached(self) -> np.ndarray:
        """``[T, n_params]`` bool: whether task ``i``'s autograd graph reaches parameter ``k``."""
        if self._reached is None:
            self._reached = np.ones((self.num_tasks, len(self.numels)), dtype=bool)
        return self._reached

    @property
    def matrix(self) -> Tensor:
        """The full ``[T, P]`` matrix (assembled when some parameters are factored)."""
        if not self.factored:
            return self.dense
        dense = iter(self.dense.split(self._dense_numels, dim=1))
        return torch.cat(
            [
                self.factored[k].dense() if k in self.factored else next(dense)
                for k in range(len(self.numels))
            ],
            dim=1,
        )

    def gramian(self, mask: np.ndarray | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``[T, T]`` Gramian of the parameters selected by ``mask`` (bool per parameter).

        Computed in ``dtype`` when given; otherwise half-precision gradients give a float32
        Gramian, so that the dot products cannot overflow.
        """
        if dtype is None and self.dense.dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        dense = self.dense if dtype is None else self.dense.to(dtype)
        if mask is None or mask.all():
            result = dense @ dense.T
            selected = self.factored
        else:
            result = dense.new_zeros(self.num_tasks, self.num_tasks)
            for start, stop in self._column_runs(mask):  # one product per run of columns
                block = dense[:, start:stop]
                result.addmm_(block, block.T)
            selected = {k: f for k, f in self.factored.items() if mask[k]}
        for factors in selected.values():
            result += factors.gramian(result.dtype)
        return result

    def leading(self, count: int) -> TaskJacobian:
        """The per-task gradients of the first ``count`` parameters (views, no copy)."""
        # The dense parameters keep their order in ``dense``: the first ones are a prefix.
        numels = self.numels[:count]
        factored = {k: f for k, f in self.factored.items() if k < count}
        width = (
            sum(n for k, n in enumerate(numels) if k not in factored) if factored else sum(numels)
        )
        reached = None if self.all_reached else self.reached[:, :count]
        return TaskJacobian(self.dense[:, :width], reached, numels, factored)

    def squared_norms(self, mask: np.ndarray | None = None) -> Tensor:
        """``[T]`` squared norms of the task gradients on the parameters selected by ``mask``.

        The Gramian's diagonal, without its off-diagonal products (what GradNorm needs).
        """
        dense = self.dense
        if dense.dtype in (torch.float16, torch.bfloat16):
            dense = dense.float()
        if mask is None or mask.all():
            if not self.factored:  # one block: two calls
                return torch.linalg.vector_norm(dense, dim=1).square()
            blocks, selected = [dense], list(self.factored.values())
        else:
            blocks = [dense[:, start:stop] for start, stop in self._column_runs(mask)]
            selected = [f for k, f in self.factored.items() if mask[k]]
        result = dense.new_zeros(self.num_tasks)
        for block in blocks:
            result += torch.linalg.vector_norm(block, dim=1).square()
        for factors in selected:
            result += factors.gramian(result.dtype).diagonal()
        return result

    def _column_runs(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """``[start, stop)`` column ranges of ``dense`` covering the selected parameters."""
        runs: list[tuple[int, int]] = []
        start = 0
        dense_mask = (bool(m) for k, m in enumerate(mask) if k not in self.factored)
        for numel, keep in zip(self._dense_numels, dense_mask, strict=True):
            if keep and runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + numel)
            elif keep:
                runs.append((start, start + numel))
            start += numel
        return runs

    def combine(self, weights: Tensor | Sequence[float]) -> list[Tensor]:
        """Per-parameter combinations of the task gradients, flattened (fresh tensors).

        ``weights`` is ``[T]`` (the same combination for every parameter) or
        ``[n_params, T]`` (row ``k`` for parameter ``k``).
        """
        weights = torch.as_tensor(weights, dtype=self.dense.dtype, device=self.dense.device)
        if weights.dim() == 1:
            # mv, not matmul: a vector-matrix matmul adds an unsqueeze and a squeeze.
            dense_parts = list(torch.mv(self.dense.t(), weights).split(self._dense_numels))
            if not self.factored:
                return dense_parts
            rows = [weights] * len(self.numels)
        else:
            rows = list(weights.unbind())
            dense_rows = [w for k, w in enumerate(rows) if k not in self.factored]
            blocks = self.dense.split(self._dense_numels, dim=1)
            dense_parts = [w @ b for w, b in zip(dense_rows, blocks, strict=True)]
        parts = iter(dense_parts)
        return [
            self.factored[k].combine(rows[k]) if k in self.factored else next(parts)
            for k in range(len(self.numels))
        ]

    def nonfinite_tasks(self) -> list[int]:
        """Tasks whose gradient holds a NaN or Inf, checked element by element.

        A factored parameter is only expanded when its Gramian is not finite.
        """
        bad = set(nonfinite_tasks(self.dense))
        for factors in self.factored.values():
            if not bool(torch.isfinite(factors.gramian().diagonal()).all()):
                bad.update(nonfinite_tasks(factors.dense()))
        return sorted(bad)


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
    return TaskJacobian(matrix, reached, numels)


class AutogradEngine:
    """The default engine: one autograd call per task (see :func:`task_jacobian`)."""

    single_backward = False

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
        return task_jacobian(losses, params, retain_graph=retain_graph)

    def reached_jacobian(
        self, losses: Sequence[Tensor], leading: Sequence[Tensor], *, reuse: bool = False
    ) -> tuple[list[Tensor], TaskJacobian]:
        """Per-task gradients of ``leading``, then of every other parameter the losses reach."""
        del reuse
        params = _unique([*leading, *graph_leaves(losses)])
        return params, task_jacobian(losses, params)


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
    roots: Sequence[Tensor], bypass: dict[torch.autograd.graph.Node, Any] | None = None
) -> list[Tensor]:
    """Leaf tensors (parameters) reached by the autograd graphs of ``roots``, in a fixed order.

    ``bypass`` maps nodes to the node the walk goes on from instead (``None``: stop there).
    """
    bypass = bypass or {}
    leaves = [root for root in roots if root.grad_fn is None and root.requires_grad]
    stack = [_follow(root.grad_fn, bypass) for root in roots if root.grad_fn is not None]
    seen = set(stack)  # autograd nodes: their Python objects live as long as the graph
    while stack:  # GradNorm walks the graph every step: keep the loop tight
        node = stack.pop()
        if node is None:
            continue
        if type(node) is _AccumulateGrad:  # a leaf's node; it has no next functions
            leaves.append(node.variable)
            continue
        for next_node, _ in node.next_functions:
            if next_node in bypass:
                next_node = _follow(next_node, bypass)
            if next_node is not None and next_node not in seen:
                seen.add(next_node)
                stack.append(next_node)
    return _unique(leaves)


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


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
