"""Per-task gradients from one backward pass, for batches partitioned by task.

When the batch fed to the model is the concatenation of the tasks' batches, the network treats
samples independently and each task's loss reads only its own rows, the per-sample output
gradients of one backward pass of ``sum_i L_i`` already separate the tasks. For the layers
registered in :mod:`.layers` a weight gradient is a sum over samples of (input x
output-gradient) products, so task ``i``'s gradient is that sum over task ``i``'s rows. A
parameter only one task's loss reaches (a per-task head on its task's rows, any layer) needs no
split: the single backward's gradient of it is that task's. Other parameters fall back to one
autograd call per task, so the result is always the full per-task Jacobian.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._autograd import _refuse_sparse, task_jacobian, unique_tensors
from .._jacobian import FactoredGradients, TaskJacobian
from .layers import linear_factors, no_rows
from .plan import Buffer, Plan, PlanCache
from .reach import sole_tasks, task_reach
from .recording import Call, Recorder, Recording, refuse_sample_mixing_layers


class BatchPartitionEngine:
    """Per-task gradients from a single backward pass over a task-partitioned batch.

    Use it when the model processes one batch that concatenates the tasks' batches (task 0's
    rows first, then task 1's, ...), treats samples independently, and each task's loss depends
    only on its own rows: the usual multi-task setting. ``nn.Linear``, ``nn.Embedding``,
    ``nn.LayerNorm``, ``nn.Conv1d`` to ``nn.Conv3d``, ``nn.GroupNorm`` and ``nn.InstanceNorm1d``
    to ``3d`` take the fast path; the parameters of any other layer are differentiated
    per task by autograd, so the result is the same Jacobian as the default engine's. So are
    those of a supported layer whose parameter is also used outside its calls (weight tying, a
    penalty on the weights in the loss), whose input or output is changed in place after the
    call, whose options change the gradient formula, or whose input does not have the batch in
    dimension 0: the engine checks at every step. A layer changed after the engine was
    created (a parametrization, ``weight_norm``, ``spectral_norm``, weight tying) is read
    again, with a warning. The model must run uncompiled: a forward pass traced by
    ``torch.compile`` is refused (the default engine handles those). Under PCGrad or GradNorm
    the engine writes every step into the same ``[T, P]`` matrix, which stays allocated
    between steps until :meth:`remove`. Which tasks reach a parameter is read from the
    autograd graph, as the default engine does: a per-task head applied to the whole batch,
    whose output only its own task's loss reads, belongs to that task alone. A parameter that
    only one task's loss reaches, of any layer (a per-task head applied to its own task's
    rows), takes the single backward too: its gradient there is that task's, and the other
    tasks' are zero.

    What the engine cannot see is a model or loss that mixes the rows of different tasks (a
    mean or a statistic over the whole batch, attention across the batch, rows not in task
    order). So by default it checks its result against per-task autograd on the first step of
    every recording pattern (the layers, their input shapes, the task sizes and the
    parameters asked for, and which parameters one task alone reaches), and again every
    ``recheck_every`` steps of that pattern, and raises if they differ: a few slower steps
    per pattern, amortized over a training run. See the guide's "Reliability" page.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose forward pass is recorded. It must not mix samples: a model with
        BatchNorm is refused.
    verify : {"first", "always", "never"}
        When to compute the Jacobian the slow way too and raise if the two differ. ``"first"``
        (default): on the first step of each recording pattern, then every ``recheck_every``
        steps of it. ``"always"``: at every step (for debugging). ``"never"``: no check, for
        a model known to keep the tasks' rows apart; a layer whose batch dimension is
        ambiguous (the batch size in more than one dimension of its input) then takes the
        slow path. ``True`` and ``False`` mean ``"always"`` and ``"never"``.
    recheck_every : int or None
        With ``verify="first"``, the steps of a pattern between two checks after its first:
        a loss or model that starts to mix the tasks' rows later in training is caught
        within this many steps of that pattern. 1000 by default: a check costs about two
        plain steps (on the LunarLander study's network), so about 0.2% of the steps' time.
        ``None``: the first step of each pattern only.
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

    def __init__(
        self,
        model: nn.Module,
        *,
        verify: str | bool = "first",
        recheck_every: int | None = 1000,
        factored: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"BatchPartitionEngine records an nn.Module's forward pass, got a "
                f"{type(model).__name__}"
            )
        if factored not in ("auto", "always", "never"):
            raise ValueError(f"factored must be 'auto', 'always' or 'never', got {factored!r}")
        if isinstance(verify, bool):
            verify = "always" if verify else "never"
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', got {verify!r}")
        whole = isinstance(recheck_every, int) and not isinstance(recheck_every, bool)
        if recheck_every is not None and not (whole and recheck_every >= 1):
            raise ValueError(
                f"recheck_every must be a positive whole number of steps, or None to check only "
                f"the first step of each pattern; got {recheck_every!r}"
            )
        refuse_sample_mixing_layers(model)
        _refuse_complex(model)
        self.model = model
        self.verify = verify
        self.recheck_every = recheck_every
        self.factored = factored
        self._recorder = Recorder(model)
        self._plans = PlanCache(factored, trust_ambiguous=verify != "never")
        self._last_plan: Plan | None = None
        self._last_sole: frozenset[int] = _NONE  # ids of the last step's sole parameters

    def record(
        self, task_sizes: Sequence[int]
    ) -> contextlib.AbstractContextManager[BatchPartitionEngine]:
        """Record the forward pass of a batch made of ``task_sizes[i]`` rows of task ``i``.

        Parameters
        ----------
        task_sizes : sequence of int
            Rows per task, in order; the batch has ``sum(task_sizes)`` rows.
        """
        sizes = _row_counts(task_sizes)
        return Recording(self._recorder, sizes, self)

    def slow_layers(self) -> dict[str, str]:
        """The recorded layers the last step differentiated per task, and why.

        Layers of types the engine has no formula for (recurrent layers, attention, ...)
        always take the slow path and are not listed.

        Examples
        --------
        >>> import torch
        >>> import gradsurgery as gs
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0))
        >>> engine = gs.BatchPartitionEngine(model)
        >>> with engine.record(task_sizes=[1, 1]):
        ...     out = model(torch.tensor([1, 2]))
        >>> jacobian = engine.jacobian([out[0].sum(), out[1].sum()], list(model.parameters()))
        >>> engine.slow_layers()
        {'0': 'it has max_norm (the table is renormalized in place at every call)'}
        """
        if self._last_plan is None:
            return {}
        names = {module: name for name, module in self.model.named_modules()}
        asked = {id(p) for p in self._last_plan.params}
        return {
            names.get(module, type(module).__name__): reason
            for module, reason in self._last_plan.slow_layers.items()
            if not self._took_single_backward(module, asked)
        }

    def _took_single_backward(self, module: nn.Module, asked: set[int]) -> bool:
        """Whether one task alone reached each of the layer's parameters asked for last step."""
        own = [id(p) for _, p in self._recorder.owned.get(module, ()) if id(p) in asked]
        return bool(own) and self._last_sole.issuperset(own)

    def remove(self) -> None:
        """Remove the engine's hooks from the model and free the matrix it keeps for reuse."""
        self._recorder.remove()
        self._plans.clear()

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
        calls, slow, _ = self._recorder.take(losses)
        return self._jacobian(losses, params, calls, slow, retain_graph, reuse)

    def reached_jacobian(
        self, losses: Sequence[Tensor], leading: Sequence[Tensor], *, reuse: bool = False
    ) -> tuple[list[Tensor], TaskJacobian]:
        """Per-task gradients of ``leading``, then of every other parameter the losses reach.

        Returns the parameters (``leading`` first) and their Jacobian. The graph walk that
        checks the recorded layers also finds the parameters: no second walk. ``reuse`` as in
        :meth:`jacobian`.
        """
        calls, slow, leaves = self._recorder.take(losses)
        recorded = [
            p for module in calls for _, p in self._recorder.owned[module] if p.requires_grad
        ]
        params = unique_tensors([*leading, *recorded, *leaves])
        return params, self._jacobian(losses, params, calls, slow, False, reuse)

    def _jacobian(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        calls: dict[nn.Module, list[Call]],
        slow: set[nn.Module],
        retain_graph: bool,
        reuse: bool,
    ) -> TaskJacobian:
        recorder = self._recorder
        sizes = recorder.task_sizes
        assert sizes is not None
        if recorder.changed:  # a layer was read again: its plans are stale
            recorder.changed = False
            self._plans.clear()
        key, plan = self._plans.plan(params, sizes, calls, slow, recorder.owned)
        if plan is not self._last_plan:
            self._last_plan = plan
            self._warn_unmatched_rows(plan, calls, sizes)
        # Slow-path parameters one task's loss alone reaches (per-task heads on their task's
        # rows, of any layer): the single backward's gradient of each is that task's. Looked
        # for at every step (a loss may start to read a head), until a walk finds none.
        sole: dict[int, int] = {}
        if plan.slow_columns and id(plan) not in self._plans.without_sole:
            sole = sole_tasks(losses, params, plan.slow_columns)
            if not sole:
                self._plans.without_sole.add(id(plan))
        self._last_sole = frozenset([id(params[k]) for k in sole]) if sole else _NONE
        pattern = (id(plan), tuple(sole.items()))  # a new assignment is checked anew
        verify = self.verify == "always" or (
            self.verify == "first" and self._plans.check_due(pattern, self.recheck_every)
        )

        # Large Linear weights stay factored (inputs and output gradients); the rest is written
        # in place, block by block, into one [T, P_dense] matrix: peak memory is that matrix
        # plus one layer's per-task gradients, never two copies of it.
        num_tasks = len(sizes)
        buffer = self._plans.buffer(key, plan, params[0], num_tasks, reuse)
        matrix, blocks = buffer.matrix, buffer.blocks
        reached = None  # every task reaches every parameter: the usual case
        # Per-task heads read by their own loss only: the walk needs the graph whole.
        reach = task_reach(losses, calls, plan.fast) if num_tasks > 1 and plan.fast else None
        if plan.slow_columns:
            reached = np.zeros((num_tasks, len(params)), dtype=bool)
            for k, t in sole.items():
                reached[t, k] = True
        per_task = [k for k in plan.slow_columns if k not in sole] if sole else plan.slow_columns
        if per_task:  # first, while the graph is whole; the single backward frees it
            slow_params = [params[k] for k in per_task]
            slow = task_jacobian(losses, slow_params, retain_graph=True)
            slow_blocks = slow.matrix.split([p.numel() for p in slow_params], dim=1)
            for k, block in zip(per_task, slow_blocks, strict=True):
                blocks[plan.dense_slot[k]].copy_(block)
            reached[:, per_task] = slow.reached
        # A check needs the graph afterwards: its autograd calls free it, unless retain_graph.
        written, factors = self._fast_path(
            plan, calls, losses, params, sole, buffer, retain_graph or verify
        )
        factored = {}
        for k in plan.factored_weight.values():
            rows = factors.get(k)
            if rows is None:  # the losses never reached the layer: no rows, a zero gradient
                p = params[k]
                rows = [(p.new_zeros(0, p.shape[1]), p.new_zeros(0, p.shape[0]), no_rows(p))]
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
        if reach is not None:  # some layer is not reached by every task's loss
            if reached is None:
                reached = np.ones((num_tasks, len(params)), dtype=bool)
            reached[:, sorted(plan.fast_columns)] = False
            for module in plan.fast:
                columns = [k for _, k in plan.targets[module]]
                if module in plan.factored_weight:
                    columns.append(plan.factored_weight[module])
                for t, layers in enumerate(reach):
                    if module in layers:
                        reached[t, columns] = True
        jacobian = TaskJacobian(matrix, reached, plan.numels, factored)
        if verify and self._agrees(losses, params, jacobian, plan, sole, calls, retain_graph):
            self._plans.verified[pattern] = 0
        return jacobian

    def _agrees(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        fast: TaskJacobian,
        plan: Plan,
        sole: dict[int, int],
        calls: dict[nn.Module, list[Call]],
        retain_graph: bool,
    ) -> bool:
        """Raise if the single backward's gradients differ from per-task autograd's; whether
        the check could judge (finite gradients).

        Task by task, on the parameters the single backward attributed (the fast path's and
        the ``sole`` ones; the slow path's come from autograd already): the check holds one
        task's gradient at a time, never a second ``[T, P]`` matrix, so a factored layer
        stays factored.
        """
        columns = [k for k in sorted(plan.fast_columns | sole.keys()) if params[k].numel()]
        if not columns:
            return True
        dense = fast.dense.split(plan.dense_numels, dim=1)
        differences, scales = [], []
        for t, loss in enumerate(losses):
            keep = retain_graph or t < len(losses) - 1
            grads = torch.autograd.grad(
                loss, [params[k] for k in columns], retain_graph=keep, allow_unused=True
            )
            for k, grad in zip(columns, grads, strict=True):
                factors = fast.factored.get(k)
                actual = factors.task(t) if factors else dense[plan.dense_slot[k]][t]
                expected = torch.zeros_like(actual) if grad is None else grad.reshape(-1)
                differences.append((actual - expected).abs().max())  # NaN stays NaN
                scales.append(expected.abs().max())
        scale = float(torch.stack(scales).max())
        if not math.isfinite(scale):
            return False  # a NaN or Inf step judges nothing: check the pattern's next step
        # The same sums in another order: rounding differences only, relative to the scale,
        # in the precision the layers computed in (autocast, TF32 on CUDA: coarser).
        tolerance = _relative_tolerance(plan, calls, fast.dense.dtype) * max(scale, _TINY)
        table = torch.stack(differences).reshape(len(losses), len(columns))
        bad = ~(table <= tolerance).all(dim=0)  # NaN counts as wrong
        if not bool(bad.any()):
            return True
        wrong = [k for k, b in zip(columns, bad.tolist(), strict=True) if b]
        difference = float(table.nan_to_num(float("inf")).max())
        raise RuntimeError(self._disagreement(wrong, params, plan, difference, scale))

    def _disagreement(
        self,
        wrong: list[int],
        params: Sequence[Tensor],
        plan: Plan,
        difference: float,
        scale: float,
    ) -> str:
        names = {id(p): name for name, p in self.model.named_parameters()}
        listed = [names.get(id(params[k]), f"parameter {k}") for k in wrong]
        shown = ", ".join(listed[:6]) + (f" and {len(listed) - 6} more" if len(listed) > 6 else "")
        layers = {module: name for name, module in self.model.named_modules()}
        doubts = "".join(
            f" {layers.get(module, type(module).__name__)}: {doubt}."
            for module, doubt in plan.ambiguous.items()
        )
        return (
            f"BatchPartitionEngine disagrees with per-task autograd on {shown} (max difference "
            f"{difference:.3g}, gradient scale {scale:.3g}). The one backward pass cannot "
            "separate the tasks: the model or a loss mixes samples of different tasks (a mean or "
            "a statistic over the whole batch, attention across the batch), the batch rows are "
            "not in the order of task_sizes, or a layer reads a time-major input "
            f"(batch_first=False).{doubts} Use the default engine (engine=None), or give each "
            "task's loss only its own rows, in task order. Nothing was changed"
        )

    def _warn_unmatched_rows(
        self, plan: Plan, calls: dict[nn.Module, list[Call]], sizes: list[int]
    ) -> None:
        """Say so when no recorded layer has ``sum(task_sizes)`` rows: task_sizes is wrong."""
        batch = sum(sizes)
        rows = [c.input.shape[0] if c.input.dim() else None for cs in calls.values() for c in cs]
        if plan.slow_layers and batch not in rows:
            warnings.warn(
                f"BatchPartitionEngine: task_sizes {sizes} sum to {batch} rows, but no recorded "
                f"layer's input has {batch} rows (their first dimensions: "
                f"{sorted(set(r for r in rows if r is not None))}); every layer takes the slow "
                "per-task path. Give task_sizes the rows of each task in the batch",
                stacklevel=4,
            )

    def _fast_path(
        self,
        plan: Plan,
        calls: dict[nn.Module, list[Call]],
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        sole: dict[int, int],
        buffer: Buffer,
        retain_graph: bool,
    ) -> tuple[set[int], dict[int, list[tuple[Tensor, Tensor, Tensor]]]]:
        """One backward pass of ``sum_i L_i`` to the recorded outputs and the ``sole``
        parameters, split by task.

        Writes the dense per-task gradients into ``buffer``; returns the fast-path columns
        written and, per factored column, the rows (inputs, output gradients, tasks) of each
        call.
        """
        blocks, views = buffer.blocks, buffer.in_place
        sizes = self._recorder.task_sizes
        assert sizes is not None
        outputs = [call.output for module in plan.fast for call in calls[module]]
        grads: Sequence[Tensor | None] = ()
        if outputs or sole:
            # The gradient of sum_i L_i: autograd adds up the losses' gradients itself.
            grads = torch.autograd.grad(
                losses,
                outputs + [params[k] for k in sole],
                retain_graph=retain_graph,
                allow_unused=True,
            )
        if sole:
            self._write_sole(plan, params, sole, grads[len(outputs) :], buffer)
        output_grads = iter(grads)
        written: set[int] = set()
        factors: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        with torch.no_grad():  # the recorded inputs are in the graph; the products are not
            for module in plan.fast:
                formula = plan.formulas[module]
                targets, factored_column = plan.targets[module], plan.factored_weight.get(module)
                for call in calls[module]:
                    grad_output = next(output_grads)
                    if grad_output is None:
                        continue
                    if factored_column is not None:
                        factors.setdefault(factored_column, []).append(
                            linear_factors(module, call.input, grad_output, sizes)
                        )
                    # A layer's first call may write its gradients straight into the matrix.
                    out = {
                        name: views[module, name]
                        for name, k, _ in plan.in_place.get(module, ())
                        if k not in written
                    }
                    task_grads = formula(
                        module, call.input, grad_output, sizes, factored_column is None, out
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

    @staticmethod
    def _write_sole(
        plan: Plan,
        params: Sequence[Tensor],
        sole: dict[int, int],
        grads: Sequence[Tensor | None],
        buffer: Buffer,
    ) -> None:
        """Row ``t`` of a parameter only task ``t`` reaches is the single backward's gradient;
        the other tasks' rows are zero."""
        for (k, t), grad in zip(sole.items(), grads, strict=True):
            block = buffer.blocks[plan.dense_slot[k]]
            block.zero_()
            if grad is None:
                continue
            if grad.layout != torch.strided:  # an Embedding with sparse=True
                _refuse_sparse(params, [grad if j == k else None for j in range(len(params))])
            block[t].copy_(grad.reshape(-1))


def _relative_tolerance(
    plan: Plan, calls: dict[nn.Module, list[Call]], dtype: torch.dtype
) -> float:
    """How far, relative to the largest gradient element, the two computations may differ.

    In the parameters' precision: ``1000 eps`` (the same sums in another order; ``4 eps`` for
    half-precision parameters, both sides rounding to them in the end). Layers that
    computed in a coarser one round their outputs' gradients differently in the two: under
    autocast (bfloat16, float16) ``4 eps`` of that dtype, which a bfloat16 layer's rounding
    stays well within (0.16 eps measured on the study's network) while a loss that mixes
    rows stays well above; with TF32 (float32 matmuls and convolutions on CUDA, when torch
    allows it) ``16 eps`` of TF32's 10-bit mantissa, both sides summing in TF32.
    """
    # Half-precision parameters: 1000 eps would be the whole scale.
    info = torch.finfo(dtype)
    tolerance = 1e3 * info.eps if info.bits >= 32 else 4 * info.eps
    for module in plan.fast:
        for call in calls[module]:
            output = call.output
            if output.is_floating_point() and torch.finfo(output.dtype).bits < 32:
                tolerance = max(tolerance, 4 * torch.finfo(output.dtype).eps)
            if output.is_cuda and output.dtype == torch.float32:
                tf32 = (
                    torch.backends.cudnn.allow_tf32
                    if isinstance(module, nn.modules.conv._ConvNd)
                    else torch.get_float32_matmul_precision() != "highest"
                )
                if tf32:
                    tolerance = max(tolerance, 16 * 2.0**-10)
    return tolerance


def _row_counts(task_sizes: Sequence[int]) -> list[int]:
    """``task_sizes`` as positive whole numbers, or a clear error."""
    if isinstance(task_sizes, (str, bytes)) or not isinstance(task_sizes, Iterable):
        raise TypeError(f"task_sizes must be a sequence of row counts, got {task_sizes!r}")
    sizes = list(task_sizes)
    if not all(type(size) is int for size in sizes):  # the usual case costs one pass
        for k, size in enumerate(sizes):
            if isinstance(size, bool):
                raise TypeError(f"task_sizes must be whole row counts, got {sizes}")
            try:
                sizes[k] = operator.index(size)  # NumPy and 0-d integer tensors too
            except TypeError:
                raise TypeError(
                    f"task_sizes must be whole row counts (int), got {sizes}: a fractional "
                    "size cannot split the batch's rows"
                ) from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"task_sizes must be positive row counts, got {sizes}")
    return sizes


def _refuse_complex(model: nn.Module) -> None:
    complex_params = [name for name, p in model.named_parameters() if p.is_complex()]
    if complex_params:
        raise TypeError(
            f"BatchPartitionEngine: {', '.join(complex_params)} are complex, which is not "
            "supported: the methods compare task gradients by real dot products; keep the "
            "real and imaginary parts as two real parameters"
        )


_TINY = torch.finfo(torch.float64).tiny
_NONE: frozenset[int] = frozenset()
