"""Per-task gradients from one backward pass, for batches partitioned by task.

When the batch fed to the model is the concatenation of the tasks' batches, the network treats
samples independently and each task's loss reads only its own rows, the per-sample output
gradients of one backward pass of ``sum_i L_i`` already separate the tasks. For the common
layers a weight gradient is a sum over samples of (input x output-gradient) products, so task
``i``'s gradient is that sum over task ``i``'s rows. Parameters of other layers fall back to one
autograd call per task, so the result is always the full per-task Jacobian.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ._engine import TaskJacobian, task_jacobian

# Exact types: a subclass may override ``forward`` and break the gradient formulas below.
_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclass(frozen=True)
class _Call:
    """One recorded forward call of a supported layer."""

    input: Tensor  # detached (indices for an Embedding)
    output: Tensor  # still in the autograd graph


class BatchPartitionEngine:
    """Per-task gradients from a single backward pass over a task-partitioned batch.

    Use it when the model processes one batch that concatenates the tasks' batches (task 0's
    rows first, then task 1's, ...), treats samples independently, and each task's loss depends
    only on its own rows: the usual multi-task setting. ``nn.Linear``, ``nn.Embedding`` and
    ``nn.LayerNorm`` take the fast path; the parameters of any other layer are differentiated
    per task by autograd, so the result is the same Jacobian as the default engine's.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose forward pass is recorded. It must not mix samples: a model with
        BatchNorm is refused.
    verify : bool
        Also compute every Jacobian the slow way and raise if the two differ (for debugging a
        model or loss that might mix samples across tasks).

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> engine = gs.BatchPartitionEngine(model)
    >>> opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine)
    >>> x, y = torch.randn(6, 4), torch.randn(6, 1)
    >>> with engine.record(task_sizes=[2, 4]):
    ...     out = model(x)
    >>> losses = [(out[:2] - y[:2]).pow(2).mean(), (out[2:] - y[2:]).pow(2).mean()]
    >>> opt.zero_grad()
    >>> info = opt.pc_backward(losses)
    >>> opt.step()
    """

    single_backward = True

    def __init__(self, model: nn.Module, *, verify: bool = False) -> None:
        mixers = [
            name or type(model).__name__
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
        if mixers:
            raise ValueError(
                "BatchPartitionEngine needs a model that treats samples independently, but "
                f"{', '.join(mixers)} is a BatchNorm layer, which mixes them; use the default "
                "engine (engine=None)"
            )
        self.model = model
        self.verify = verify
        self._task_sizes: list[int] | None = None
        self._recording = False
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._unrecorded: set[nn.Module] = set()
        layers = [module for module in model.modules() if type(module) in _SUPPORTED]
        self._owned = {m: list(m.named_parameters(recurse=False)) for m in layers}
        self._handles = [
            module.register_forward_hook(self._on_forward, with_kwargs=True) for module in layers
        ]

    @contextlib.contextmanager
    def record(self, task_sizes: Sequence[int]) -> Iterator[BatchPartitionEngine]:
        """Record the forward pass of a batch made of ``task_sizes[i]`` rows of task ``i``.

        Parameters
        ----------
        task_sizes : sequence of int
            Rows per task, in order; the batch has ``sum(task_sizes)`` rows.
        """
        sizes = [int(s) for s in task_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"task_sizes must be positive row counts, got {list(task_sizes)}")
        self._task_sizes = sizes
        self._calls = {}
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def remove(self) -> None:
        """Remove the engine's hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = {}

    def jacobian(
        self, losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> TaskJacobian:
        """Per-task gradients of ``params`` for the losses of the last recorded forward pass."""
        if self._task_sizes is None or not self._calls:
            raise RuntimeError(
                "BatchPartitionEngine recorded no forward pass: run the model inside "
                "`with engine.record(task_sizes):` before the backward"
            )
        if len(losses) != len(self._task_sizes):
            raise ValueError(
                f"{len(losses)} losses for a batch recorded with {len(self._task_sizes)} tasks "
                f"(task_sizes={self._task_sizes})"
            )
        sizes = self._task_sizes
        reference = task_jacobian(losses, params, retain_graph=True) if self.verify else None
        calls, self._calls = self._calls, {}
        unrecorded, self._unrecorded = self._unrecorded, set()
        requested = {id(p) for p in params}
        fast = {
            module: module_calls
            for module, module_calls in calls.items()
            if module not in unrecorded
            and _fast_path_applies(module)
            and all(call.input.shape[0] == sum(sizes) for call in module_calls)
            and any(id(p) in requested for _, p in self._owned[module])
        }
        if unrecorded & calls.keys():
            names = {module: name for name, module in self.model.named_modules()}
            warnings.warn(
                "BatchPartitionEngine: "
                + ", ".join(
                    sorted(names.get(m, type(m).__name__) for m in unrecorded & calls.keys())
                )
                + " ran with grad enabled outside engine.record() since the last backward; "
                "their parameters took the slow per-task path this step",
                stacklevel=3,
            )

        # The result is written in place, block by block: peak memory is the [T, P] matrix
        # plus one layer's per-task gradients, not two copies of the matrix.
        num_tasks, numels = len(losses), [p.numel() for p in params]
        first = params[0]
        matrix = first.new_empty(num_tasks, sum(numels))
        blocks = dict(zip(map(id, params), matrix.split(numels, dim=1), strict=True))
        column = {id(p): k for k, p in enumerate(params)}
        reached = np.zeros((num_tasks, len(params)), dtype=bool)
        owned = {id(p) for module in fast for _, p in self._owned[module]}
        slow_params = [p for p in params if id(p) not in owned]
        if slow_params:  # first, while the graph is whole; the single backward frees it
            slow = task_jacobian(losses, slow_params, retain_graph=True)
            slow_blocks = slow.matrix.split([p.numel() for p in slow_params], dim=1)
            for k, (p, block) in enumerate(zip(slow_params, slow_blocks, strict=True)):
                blocks[id(p)].copy_(block)
                reached[:, column[id(p)]] = slow.reached[:, k]

        outputs = [call.output for module_calls in fast.values() for call in module_calls]
        grads: Sequence[Tensor | None] = ()
        if outputs:
            total = torch.stack(list(losses)).sum()
            grads = torch.autograd.grad(
                total, outputs, retain_graph=retain_graph, allow_unused=True
            )
        output_grads = iter(grads)
        for module, module_calls in fast.items():
            for call in module_calls:
                grad_output = next(output_grads)
                if grad_output is None:
                    continue
                for name, grad in _task_grads(module, call.input, grad_output, sizes).items():
                    p = getattr(module, name)
                    if id(p) not in requested:
                        continue
                    k = column[id(p)]
                    if reached[0, k]:  # a second call of the same layer adds to the first
                        blocks[id(p)].add_(grad.reshape(num_tasks, -1))
                    else:
                        blocks[id(p)].copy_(grad.reshape(num_tasks, -1))
                        reached[:, k] = True
        for p in params:  # fast-path layers the losses never reached
            if id(p) in owned and not reached[0, column[id(p)]]:
                blocks[id(p)].zero_()
        jacobian = TaskJacobian(matrix, reached)
        if reference is not None:
            _check_agreement(jacobian, reference)
        return jacobian

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            return
        x = args[0] if args else kwargs.get("input")
        if not self._recording or not isinstance(x, Tensor):
            # A call the engine cannot attribute to tasks: its module takes the slow path.
            self._unrecorded.add(module)
            return
        self._calls.setdefault(module, []).append(_Call(x.detach(), output))


def _fast_path_applies(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return not module.sparse and module.max_norm is None
    return True


def _task_index(sizes: Sequence[int], device: torch.device) -> Tensor:
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )


def _task_sums(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sum of ``values`` (``[N, ...]``) over each task's rows: ``[T, ...]``."""
    if len(set(sizes)) == 1:
        return values.reshape(len(sizes), sizes[0], *values.shape[1:]).sum(dim=1)
    out = values.new_zeros(len(sizes), *values.shape[1:])
    return out.index_add_(0, _task_index(sizes, values.device), values)


def _task_grads(
    module: nn.Module, x: Tensor, grad_output: Tensor, sizes: Sequence[int]
) -> dict[str, Tensor]:
    """Per-task gradients ``{param name: [T, *param.shape]}`` of one call of a layer."""
    if isinstance(module, nn.Linear):
        return _linear_task_grads(module, x, grad_output, sizes)
    num_rows = x.shape[0]
    if isinstance(module, nn.Embedding):
        dim, rows = module.embedding_dim, module.num_embeddings
        g = grad_output.reshape(num_rows, -1, dim).to(module.weight.dtype)
        index = x.reshape(num_rows, -1)
        # Task t's rows go to block t of a [T * rows, dim] table: one index_add for all tasks.
        index = index + (_task_index(sizes, index.device) * rows)[:, None]
        table = g.new_zeros(len(sizes) * rows, dim).index_add_(
            0, index.flatten(), g.reshape(-1, dim)
        )
        table = table.reshape(len(sizes), rows, dim)
        if module.padding_idx is not None:
            table[:, module.padding_idx] = 0
        return {"weight": table}
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        normalized = nnf.layer_norm(x.to(grad_output.dtype), shape, eps=module.eps)
        g = grad_output.reshape(num_rows, -1, *shape)
        grads = {}
        if module.weight is not None:
            product = (g * normalized.reshape(g.shape)).sum(dim=1)
            grads["weight"] = _task_sums(product, sizes).to(module.weight.dtype)
        if module.bias is not None:
            grads["bias"] = _task_sums(g.sum(dim=1), sizes).to(module.bias.dtype)
        return grads
    raise AssertionError(f"unsupported layer {type(module).__name__}")


def _linear_task_grads(
    module: nn.Linear, x: Tensor, grad_output: Tensor, sizes: Sequence[int]
) -> dict[str, Tensor]:
    """``W_t = sum over task t's rows of g x^T``, ``b_t = sum of g`` (extra dims summed too)."""
    dtype = module.weight.dtype
    x, g = x.to(dtype), grad_output.to(dtype)
    if len(set(sizes)) == 1:  # one batched matmul: the same FLOPs as the plain weight grad
        xs = x.reshape(len(sizes), -1, module.in_features)
        gs = g.reshape(len(sizes), -1, module.out_features)
        grads = {"weight": gs.transpose(1, 2) @ xs}
        if module.bias is not None:
            grads["bias"] = gs.sum(dim=1)
        return grads
    x = x.reshape(x.shape[0], -1, module.in_features)
    g = g.reshape(g.shape[0], -1, module.out_features)
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    weight = torch.stack(
        [
            g[a : a + n].reshape(-1, module.out_features).T
            @ x[a : a + n].reshape(-1, module.in_features)
            for a, n in zip(starts, sizes, strict=True)
        ]
    )
    grads = {"weight": weight}
    if module.bias is not None:
        grads["bias"] = _task_sums(g.sum(dim=1), sizes)
    return grads


def _check_agreement(fast: TaskJacobian, reference: TaskJacobian) -> None:
    scale = reference.matrix.abs().max().clamp_min(1.0)
    tolerance = 1e3 * torch.finfo(reference.matrix.dtype).eps * scale
    difference = (fast.matrix - reference.matrix).abs().max()
    if difference > tolerance:
        raise RuntimeError(
            f"BatchPartitionEngine disagrees with per-task autograd (max difference "
            f"{float(difference):.3g}): the model or a loss mixes samples of different tasks, "
            "or the batch rows are not in task order"
        )
