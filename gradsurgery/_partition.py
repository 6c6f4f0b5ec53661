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
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ._engine import (
    FactoredGradients,
    TaskJacobian,
    _unique,
    graph_leaves,
    outer_sums,
    task_jacobian,
)

try:
    from torch.compiler import is_compiling as _is_compiling  # public from torch 2.3
except ImportError:  # torch 2.2
    from torch._dynamo import is_compiling as _is_compiling

# Exact types: a subclass may override ``forward`` and break the gradient formulas below.
_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class _Call(NamedTuple):
    """One recorded forward call of a supported layer."""

    input: Tensor  # as passed, in the autograd graph (indices for an Embedding)
    output: Tensor  # in the autograd graph
    versions: tuple[int, int]  # of input and output when recorded: an in-place change shows

    def modified(self) -> bool:
        """Whether the input or the output was changed in place after the call."""
        return (self.input._version, self.output._version) != self.versions


@dataclass(frozen=True)
class _Plan:
    """Where every parameter's per-task gradients come from, for one pattern of calls.

    Worked out once per (parameters, task sizes, recorded layers and shapes) and reused: a
    training loop repeats the same pattern every step.
    """

    fast: list[nn.Module]  # fast-path layers, in recording order
    targets: dict[nn.Module, list[tuple[str, int]]]  # (parameter name, column) kept dense
    factored_weight: dict[nn.Module, int]  # Linear layers whose weight stays factored
    in_place: dict[nn.Module, list[tuple[str, int, torch.Size]]]  # written directly
    dense_numels: list[int]  # sizes of the dense blocks, in column order
    dense_slot: dict[int, int]  # column -> index of its dense block
    slow_columns: list[int]  # differentiated per task by autograd
    fast_dense_columns: frozenset[int]
    fast_columns: set[int]  # every column the single backward fills, dense or factored
    fast_reached: np.ndarray  # [n_params] bool: those columns
    numels: list[int]
    params: tuple[Tensor, ...]  # held so that the ids in the cache key stay theirs


class _Buffer(NamedTuple):
    """The ``[T, P_dense]`` matrix of a plan, its blocks and the views written in place."""

    matrix: Tensor
    blocks: tuple[Tensor, ...]  # one per dense parameter, in column order
    in_place: dict[tuple[nn.Module, str], Tensor]  # [T, *shape] views of some blocks

    @classmethod
    def allocate(cls, plan: _Plan, like: Tensor, num_tasks: int) -> _Buffer:
        matrix = like.new_empty(num_tasks, sum(plan.dense_numels))
        blocks = matrix.split(plan.dense_numels, dim=1)
        in_place = {
            (module, name): blocks[plan.dense_slot[k]].view(num_tasks, *shape)
            for module, specs in plan.in_place.items()
            for name, k, shape in specs
        }
        return cls(matrix, blocks, in_place)


class BatchPartitionEngine:
    """Per-task gradients from a single backward pass over a task-partitioned batch.

    Use it when the model processes one batch that concatenates the tasks' batches (task 0's
    rows first, then task 1's, ...), treats samples independently, and each task's loss depends
    only on its own rows: the usual multi-task setting. ``nn.Linear``, ``nn.Embedding`` and
    ``nn.LayerNorm`` take the fast path; the parameters of any other layer are differentiated
    per task by autograd, so the result is the same Jacobian as the default engine's. So are
    those of a supported layer whose parameter is also used outside its calls (weight tying, a
    penalty on the weights in the loss) or whose input or output is changed in place after the
    call: the engine detects both at every step and warns once. The model must run uncompiled:
    a forward pass traced by ``torch.compile`` is refused (the default engine handles those).
    Under PCGrad or GradNorm the engine writes every step into the same ``[T, P]`` matrix,
    which stays allocated between steps until :meth:`remove`.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose forward pass is recorded. It must not mix samples: a model with
        BatchNorm is refused.
    verify : bool
        Also compute every Jacobian the slow way and raise if the two differ (for debugging a
        model or loss that might mix samples across tasks).
    factored : {"auto", "always", "never"}
        How a Linear layer's per-task weight gradients are kept. Dense: ``T`` matrices of
        ``in x out``. Factored: the layer's inputs and output gradients (``M`` rows), from which
        the Gramian and any combination come without the ``[T, in * out]`` matrix (the "ghost
        norm" trick); its cost grows with ``M^2`` instead of ``T^2``, and it saves the
        ``[T, P]`` memory. ``"auto"`` (default) picks the cheaper one per layer: dense for
        small layers and few tasks (the LunarLander study's network), factored for wide
        layers with many tasks.

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

    def __init__(self, model: nn.Module, *, verify: bool = False, factored: str = "auto") -> None:
        if factored not in ("auto", "always", "never"):
            raise ValueError(f"factored must be 'auto', 'always' or 'never', got {factored!r}")
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
        self.factored = factored
        self._task_sizes: list[int] | None = None
        self._recording = False
        self._compiled = False  # a hooked layer ran inside a torch.compile graph
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._unrecorded: set[nn.Module] = set()
        self._warned: set[nn.Module] = set()  # layers found unsafe (warned about once)
        self._plans: dict[tuple, _Plan] = {}
        self._buffers: dict[tuple, _Buffer] = {}  # per plan key, for reuse=True
        layers = [module for module in model.modules() if type(module) in _SUPPORTED]
        self._owned = {m: list(m.named_parameters(recurse=False)) for m in layers}
        self._owner = {id(p): m for m, owned in self._owned.items() for _, p in owned}
        self._handles = [
            module.register_forward_hook(self._on_forward, with_kwargs=True) for module in layers
        ]

    def record(
        self, task_sizes: Sequence[int]
    ) -> contextlib.AbstractContextManager[BatchPartitionEngine]:
        """Record the forward pass of a batch made of ``task_sizes[i]`` rows of task ``i``.

        Parameters
        ----------
        task_sizes : sequence of int
            Rows per task, in order; the batch has ``sum(task_sizes)`` rows.
        """
        sizes = [int(s) for s in task_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"task_sizes must be positive row counts, got {list(task_sizes)}")
        return _Recording(self, sizes)

    def remove(self) -> None:
        """Remove the engine's hooks from the model and free the matrix it keeps for reuse."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = {}
        self._plans.clear()
        self._buffers.clear()

    def jacobian(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        reuse: bool = False,
    ) -> TaskJacobian:
        """Per-task gradients of ``params`` for the losses of the last recorded forward pass.

        With ``reuse``, the gradients are written into the matrix of the last call that reused
        one for the same layout, overwriting the Jacobian it returned: for callers that drop
        the Jacobian within their step (PCGrad, GradNorm), it saves allocating the matrix and
        its per-layer views at every step.
        """
        calls, slow, _ = self._take_recording(losses)
        return self._jacobian(losses, params, calls, slow, retain_graph, reuse)

    def reached_jacobian(
        self, losses: Sequence[Tensor], leading: Sequence[Tensor], *, reuse: bool = False
    ) -> tuple[list[Tensor], TaskJacobian]:
        """Per-task gradients of ``leading``, then of every other parameter the losses reach.

        Returns the parameters (``leading`` first) and their Jacobian. The graph walk that
        checks the recorded layers also finds the parameters: no second walk. ``reuse`` as in
        :meth:`jacobian`.
        """
        calls, slow, leaves = self._take_recording(losses)
        recorded = [p for module in calls for _, p in self._owned[module] if p.requires_grad]
        params = _unique([*leading, *recorded, *leaves])
        return params, self._jacobian(losses, params, calls, slow, False, reuse)

    def _take_recording(
        self, losses: Sequence[Tensor]
    ) -> tuple[dict[nn.Module, list[_Call]], set[nn.Module], list[Tensor]]:
        """The recorded calls (the engine forgets them), the layers that must take the slow
        path, and the leaves the losses reach outside the recorded calls."""
        if self._compiled:
            raise RuntimeError(
                "BatchPartitionEngine cannot record a model run by torch.compile: the compiled "
                "graph hides its layers' outputs from autograd. Use the default engine "
                "(engine=None), which works with compiled models, or run the model uncompiled"
            )
        if self._task_sizes is None or not self._calls:
            raise RuntimeError(
                "BatchPartitionEngine recorded no forward pass: run the model inside "
                "`with engine.record(task_sizes):` before the backward (a model compiled by "
                "torch.compile may skip the engine's hooks: use the default engine with it)"
            )
        if len(losses) != len(self._task_sizes):
            raise ValueError(
                f"{len(losses)} losses for a batch recorded with {len(self._task_sizes)} tasks "
                f"(task_sizes={self._task_sizes})"
            )
        calls, self._calls = self._calls, {}
        unrecorded = self._unrecorded
        if unrecorded:  # the usual step has none: no set operations
            self._unrecorded = set()
        if unrecorded and unrecorded & calls.keys():
            names = {module: name for name, module in self.model.named_modules()}
            warnings.warn(
                "BatchPartitionEngine: "
                + ", ".join(
                    sorted(names.get(m, type(m).__name__) for m in unrecorded & calls.keys())
                )
                + " ran with grad enabled outside engine.record() since the last backward; "
                "their parameters took the slow per-task path this step",
                stacklevel=4,
            )
        unsafe, leaves = self._unsafe_layers(losses, calls)
        slow = (unrecorded | unsafe) & calls.keys() if unrecorded or unsafe else set()
        return calls, slow, leaves

    def _jacobian(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        calls: dict[nn.Module, list[_Call]],
        slow: set[nn.Module],
        retain_graph: bool,
        reuse: bool,
    ) -> TaskJacobian:
        sizes = self._task_sizes
        assert sizes is not None
        reference = task_jacobian(losses, params, retain_graph=True) if self.verify else None
        key = (
            tuple(map(id, params)),
            tuple(sizes),
            tuple(calls),
            tuple([c.input.shape for cs in calls.values() for c in cs]),
            frozenset(slow),
        )
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:  # training loops repeat a few shapes; do not grow
                self._plans.clear()
                self._buffers.clear()
            plan = self._plans[key] = self._plan(params, calls, slow)

        # Large Linear weights stay factored (inputs and output gradients); the rest is written
        # in place, block by block, into one [T, P_dense] matrix: peak memory is that matrix
        # plus one layer's per-task gradients, never two copies of it.
        num_tasks = len(sizes)
        buffer = self._buffers.get(key) if reuse else None
        if buffer is None:
            buffer = _Buffer.allocate(plan, params[0], num_tasks)
            if reuse:
                self._buffers[key] = buffer
        matrix, blocks = buffer.matrix, buffer.blocks
        reached = None  # every task reaches every parameter: the usual case
        if plan.slow_columns:  # first, while the graph is whole; the single backward frees it
            slow_params = [params[k] for k in plan.slow_columns]
            slow = task_jacobian(losses, slow_params, retain_graph=True)
            slow_blocks = slow.matrix.split([p.numel() for p in slow_params], dim=1)
            for k, block in zip(plan.slow_columns, slow_blocks, strict=True):
                blocks[plan.dense_slot[k]].copy_(block)
            reached = np.zeros((num_tasks, len(params)), dtype=bool)
            reached[:, plan.slow_columns] = slow.reached
        written, factors = self._fast_path(plan, calls, losses, buffer, retain_graph)
        factored = {}
        for k in plan.factored_weight.values():
            rows = factors.get(k)
            if rows is None:  # the losses never reached the layer: no rows, a zero gradient
                p = params[k]
                rows = [(p.new_zeros(0, p.shape[1]), p.new_zeros(0, p.shape[0]), _no_rows(p))]
            else:
                written.add(k)
            inputs, grads_out, row_tasks = (torch.cat(parts) for parts in zip(*rows, strict=True))
            factored[k] = FactoredGradients(inputs, grads_out, row_tasks, num_tasks)
        if written != plan.fast_columns:  # a fast-path layer the losses never reached
            if reached is None:
                reached = np.zeros((num_tasks, len(params)), dtype=bool)
            reached[:, sorted(written)] = True
        elif reached is not None:
            reached |= plan.fast_reached
        jacobian = TaskJacobian(matrix, reached, plan.numels, factored)
        if reference is not None:
            _check_agreement(jacobian, reference)
        return jacobian

    def _unsafe_layers(
        self, losses: Sequence[Tensor], calls: dict[nn.Module, list[_Call]]
    ) -> tuple[set[nn.Module], list[Tensor]]:
        """Recorded layers whose calls do not give their parameters' whole gradient, and the
        leaves the losses reach outside the recorded calls.

        A parameter may also be used outside its layer's calls (weight tying, a penalty on the
        weights in the loss), and a call's input or output may have been changed in place
        afterwards. Either makes ``D^T X`` wrong, so those layers take the slow path. The check
        walks the graph from the losses, stepping over every recorded call (from its output to
        its input): a layer parameter still reached is used somewhere else.
        """
        unsafe = {module for module, cs in calls.items() for c in cs if c.modified()}
        bypass = {
            c.output.grad_fn: c.input.grad_fn
            for module, cs in calls.items()
            if module not in unsafe
            for c in cs
        }
        leaves = graph_leaves(losses, bypass)
        leaves += [
            c.input
            for cs in calls.values()
            for c in cs
            if c.input.grad_fn is None and c.input.requires_grad
        ]
        for leaf in leaves:  # the second kind: a layer parameter fed to a recorded call
            module = self._owner.get(id(leaf))
            if module in calls:  # layers without recorded calls take the slow path anyway
                unsafe.add(module)
        if unsafe - self._warned:
            self._warned |= unsafe
            names = {module: name for name, module in self.model.named_modules()}
            warnings.warn(
                "BatchPartitionEngine: "
                + ", ".join(sorted(names.get(m, type(m).__name__) for m in unsafe))
                + ": a parameter is also used outside the layer's calls (weight tying, a "
                "penalty in the loss) or the layer's input or output was changed in place; "
                "these layers take the slow per-task path",
                stacklevel=5,
            )
        return unsafe, leaves

    def _fast_path(
        self,
        plan: _Plan,
        calls: dict[nn.Module, list[_Call]],
        losses: Sequence[Tensor],
        buffer: _Buffer,
        retain_graph: bool,
    ) -> tuple[set[int], dict[int, list[tuple[Tensor, Tensor, Tensor]]]]:
        """One backward pass of ``sum_i L_i`` to the recorded outputs, split by task.

        Writes the dense per-task gradients into ``buffer``; returns the columns written and,
        per factored column, the rows (inputs, output gradients, tasks) of each call.
        """
        blocks, views = buffer.blocks, buffer.in_place
        sizes = self._task_sizes
        assert sizes is not None
        outputs = [call.output for module in plan.fast for call in calls[module]]
        grads: Sequence[Tensor | None] = ()
        if outputs:
            # The gradient of sum_i L_i: autograd adds up the losses' gradients itself.
            grads = torch.autograd.grad(
                losses, outputs, retain_graph=retain_graph, allow_unused=True
            )
        output_grads = iter(grads)
        written: set[int] = set()
        factors: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        with torch.no_grad():  # the recorded inputs are in the graph; the products are not
            for module in plan.fast:
                targets, factored_column = plan.targets[module], plan.factored_weight.get(module)
                for call in calls[module]:
                    grad_output = next(output_grads)
                    if grad_output is None:
                        continue
                    if factored_column is not None:
                        factors.setdefault(factored_column, []).append(
                            _linear_factors(module, call.input, grad_output, sizes)
                        )
                    # A layer's first call may write its gradients straight into the matrix.
                    out = {
                        name: views[module, name]
                        for name, k, _ in plan.in_place.get(module, ())
                        if k not in written
                    }
                    task_grads = _task_grads(
                        module,
                        call.input,
                        grad_output,
                        sizes,
                        weight=factored_column is None,
                        out=out,
                    )
                    for name, k in targets:
                        grad = task_grads[name]
                        if grad is out.get(name):  # already in place
                            written.add(k)
                        elif k in written:  # a second call of the same layer adds to the first
                            blocks[plan.dense_slot[k]].add_(grad.reshape(len(sizes), -1))
                        else:
                            blocks[plan.dense_slot[k]].copy_(grad.reshape(len(sizes), -1))
                            written.add(k)
        for k in plan.fast_dense_columns - written:  # layers the losses never reached
            blocks[plan.dense_slot[k]].zero_()
        return written, factors

    def _plan(
        self,
        params: Sequence[Tensor],
        calls: dict[nn.Module, list[_Call]],
        slow: set[nn.Module],
    ) -> _Plan:
        """Which parameters take the fast path, which are factored, where each one goes."""
        sizes = self._task_sizes
        assert sizes is not None
        column = {id(p): k for k, p in enumerate(params)}
        fast = [
            module
            for module, module_calls in calls.items()
            if module not in slow
            and _fast_path_applies(module)
            and all(call.input.shape[0] == sum(sizes) for call in module_calls)
            and any(id(p) in column for _, p in self._owned[module])
        ]
        factored_weight = {
            module: column[id(module.weight)]
            for module in fast
            if isinstance(module, nn.Linear)
            and id(module.weight) in column
            and self._factor(module, sum(c.input.numel() for c in calls[module]), len(sizes))
        }
        targets = {
            module: [
                (name, column[id(p)])
                for name, p in self._owned[module]
                if id(p) in column and column[id(p)] != factored_weight.get(module)
            ]
            for module in fast
        }
        in_place = {  # dense parameters of the matrix's dtype: written with no copy
            module: [
                (name, column[id(p)], p.shape)
                for name, p in self._owned[module]
                if (name, column.get(id(p))) in targets[module]
            ]
            for module in fast
            if isinstance(module, (nn.Linear, nn.Embedding))
            and all(p.dtype == params[0].dtype for _, p in self._owned[module])
        }
        fast_columns = {k for module_targets in targets.values() for _, k in module_targets}
        factored_columns = set(factored_weight.values())
        dense = [k for k in range(len(params)) if k not in factored_columns]
        fast_reached = np.zeros(len(params), dtype=bool)
        fast_reached[sorted(fast_columns | factored_columns)] = True
        return _Plan(
            fast=fast,
            targets=targets,
            factored_weight=factored_weight,
            in_place=in_place,
            dense_numels=[params[k].numel() for k in dense],
            dense_slot={k: slot for slot, k in enumerate(dense)},
            slow_columns=[k for k in dense if k not in fast_columns],
            fast_dense_columns=frozenset(fast_columns),
            fast_columns=fast_columns | factored_columns,
            fast_reached=fast_reached,
            numels=[p.numel() for p in params],
            params=tuple(params),
        )

    def _factor(self, layer: nn.Linear, input_numel: int, num_tasks: int) -> bool:
        """Whether to keep this layer's per-task weight gradients factored (see the class)."""
        if self.factored != "auto":
            return self.factored == "always"
        rows, fan_in, fan_out = (
            input_numel // layer.in_features,
            layer.in_features,
            layer.out_features,
        )
        # Factored: an [M, M] kernel from the inputs and output gradients, reduced to [T, T].
        # Dense: T per-task [out, in] gradients, their Gramian and their combination.
        factored_cost = rows * rows * (fan_in + fan_out + num_tasks)
        dense_cost = num_tasks * (num_tasks + 1) * fan_in * fan_out
        return factored_cost < dense_cost

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad:  # also under no_grad
            return
        if _is_compiling():
            # Traced by torch.compile, this hook would record tensors the compiled graph
            # returns, not the ones its backward runs through. Dynamo replays this flag.
            self._compiled = True
            return
        x = args[0] if args else kwargs.get("input")
        if not self._recording or not isinstance(x, Tensor):
            # A call the engine cannot attribute to tasks: its module takes the slow path.
            self._unrecorded.add(module)
            return
        versions = (x._version, output._version)
        self._calls.setdefault(module, []).append(_Call(x, output, versions))


class _Recording:
    """The context :meth:`BatchPartitionEngine.record` returns.

    A class rather than ``contextlib.contextmanager``: a generator-based context costs several
    microseconds, and a training loop enters this one at every step.
    """

    __slots__ = ("engine", "sizes")

    def __init__(self, engine: BatchPartitionEngine, sizes: list[int]) -> None:
        self.engine, self.sizes = engine, sizes

    def __enter__(self) -> BatchPartitionEngine:
        engine = self.engine
        engine._task_sizes = self.sizes
        engine._calls = {}
        engine._compiled = False
        engine._recording = True
        return engine

    def __exit__(self, *exc_info: object) -> None:
        self.engine._recording = False


def _fast_path_applies(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return not module.sparse and module.max_norm is None
    return True


def _no_rows(p: Tensor) -> Tensor:
    return torch.zeros(0, dtype=torch.long, device=p.device)


def _task_index(sizes: Sequence[int], device: torch.device, per_sample: int = 1) -> Tensor:
    """The task of every row (``per_sample`` rows per sample), ``[sum(sizes) * per_sample]``.

    Shared between calls: do not modify it.
    """
    return _cached_task_index(tuple(sizes), device, per_sample)


@functools.lru_cache(maxsize=16)
def _cached_task_index(sizes: tuple[int, ...], device: torch.device, per_sample: int) -> Tensor:
    counts = torch.tensor(sizes, device=device) * per_sample
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def _task_sums(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sum of ``values`` (``[N, ...]``) over each task's rows: ``[T, ...]``."""
    if len(set(sizes)) == 1:
        return values.reshape(len(sizes), sizes[0], *values.shape[1:]).sum(dim=1)
    out = values.new_zeros(len(sizes), *values.shape[1:])
    return out.index_add_(0, _task_index(sizes, values.device), values)


def _task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool = True,
    out: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-task gradients ``{param name: [T, *param.shape]}`` of one call of a layer.

    ``weight=False`` leaves out a Linear layer's weight (kept factored instead). ``out`` maps
    parameter names to ``[T, *param.shape]`` tensors a Linear or Embedding layer's gradients
    may be written into, in which case the returned entry is that tensor itself.
    """
    out = out or {}
    if isinstance(module, nn.Linear):
        return _linear_task_grads(module, x, grad_output, sizes, weight, out)
    num_rows = x.shape[0]
    if isinstance(module, nn.Embedding):
        embeddings = module._parameters["weight"]
        tokens = x.reshape(-1)
        tasks = _task_index(sizes, x.device, tokens.shape[0] // num_rows)
        g = grad_output.reshape(-1, embeddings.shape[1]).to(embeddings.dtype)
        # Token k of task t adds its output gradient to row k of task t's table: one call.
        table = out["weight"].zero_() if out else g.new_zeros(len(sizes), *embeddings.shape)
        table.index_put_((tasks, tokens), g, accumulate=True)
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
    module: nn.Linear,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """``W_t = sum over task t's rows of g x^T``, ``b_t = sum of g`` (extra dims summed too)."""
    # From the registry, not ``module.weight``: nn.Module.__getattr__ is a Python call, and this
    # runs for every layer at every step.
    parameters = module._parameters
    dtype, has_bias = parameters["weight"].dtype, parameters["bias"] is not None
    g = grad_output if grad_output.dtype == dtype else grad_output.to(dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    grads = {}
    if len(set(sizes)) == 1:  # one batched matmul: the same FLOPs as the plain weight grad
        gs = g.reshape(len(sizes), -1, module.out_features)
        if weight:
            xs = x.reshape(len(sizes), -1, module.in_features)
            grads["weight"] = outer_sums(gs, xs, out.get("weight"))
        if has_bias:
            grads["bias"] = torch.sum(gs, dim=1, out=out.get("bias"))
        return grads
    g = g.reshape(g.shape[0], -1, module.out_features)
    if weight:
        x = x.reshape(x.shape[0], -1, module.in_features)
        starts = [sum(sizes[:t]) for t in range(len(sizes))]
        grads["weight"] = torch.stack(
            [
                outer_sums(
                    g[a : a + n].reshape(-1, module.out_features),
                    x[a : a + n].reshape(-1, module.in_features),
                )
                for a, n in zip(starts, sizes, strict=True)
            ]
        )
    if has_bias:
        grads["bias"] = _task_sums(g.sum(dim=1), sizes)
    return grads


def _linear_factors(
    module: nn.Linear, x: Tensor, grad_output: Tensor, sizes: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """A Linear call's rows: inputs ``[M, in]``, output gradients ``[M, out]``, tasks ``[M]``."""
    dtype = module.weight.dtype
    inputs = x.detach().to(dtype).reshape(-1, module.in_features)  # kept beyond the no_grad
    rows_per_sample = inputs.shape[0] // x.shape[0]
    row_tasks = _task_index(sizes, x.device, rows_per_sample)
    return inputs, grad_output.to(dtype).reshape(-1, module.out_features), row_tasks


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
