"""Where every parameter's per-task gradients come from, worked out once per call pattern.

A training loop repeats the same pattern every step (parameters, task sizes, recorded layers
and their input shapes), so the plan and the ``[T, P]`` matrix it fills are cached per
pattern: the per-step work is the products themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch import Tensor, nn

from .layers import LAYERS, TaskGrads
from .recording import Call

_MAX_PLANS = 8  # training loops repeat a few shapes; the cache must not grow without bound


@dataclass(frozen=True)
class Plan:
    """Where every parameter's per-task gradients come from, for one pattern of calls."""

    fast: list[nn.Module]  # fast-path layers, in recording order
    formulas: dict[nn.Module, TaskGrads]  # each fast layer's per-task gradient formula
    targets: dict[nn.Module, list[tuple[str, int]]]  # (parameter name, column) kept dense
    factored_weight: dict[nn.Module, int]  # Linear layers whose weight stays factored
    in_place: dict[nn.Module, list[tuple[str, int, tuple[int, ...]]]]  # written directly
    dense_numels: list[int]  # sizes of the dense blocks, in column order
    dense_slot: dict[int, int]  # column -> index of its dense block
    slow_columns: list[int]  # differentiated per task by autograd
    fast_dense_columns: frozenset[int]
    fast_columns: set[int]  # every column the single backward fills, dense or factored
    fast_reached: np.ndarray  # [n_params] bool: those columns
    numels: list[int]
    params: tuple[Tensor, ...]  # held so that the ids in the cache key stay theirs
    slow_layers: dict[nn.Module, str]  # recorded layers left to the slow path, and why
    ambiguous: dict[nn.Module, str]  # fast layers whose batch dimension only a check confirms


class Buffer(NamedTuple):
    """The ``[T, P_dense]`` matrix of a plan, its blocks and the views written in place."""

    matrix: Tensor
    blocks: tuple[Tensor, ...]  # one per dense parameter, in column order
    in_place: dict[tuple[nn.Module, str], Tensor]  # [T, *shape] views of some blocks

    @classmethod
    def allocate(cls, plan: Plan, like: Tensor, num_tasks: int) -> Buffer:
        matrix = like.new_empty(num_tasks, sum(plan.dense_numels))
        blocks = matrix.split(plan.dense_numels, dim=1)
        in_place = {
            (module, name): blocks[plan.dense_slot[k]].view(num_tasks, *shape)
            for module, specs in plan.in_place.items()
            for name, k, shape in specs
        }
        return cls(matrix, blocks, in_place)


class PlanCache:
    """Plans per call pattern, and (for ``reuse``) the matrix each one last filled."""

    def __init__(self, factored: str, trust_ambiguous: bool) -> None:
        self.factored = factored
        self.trust_ambiguous = trust_ambiguous  # the engine checks such plans against autograd
        self._plans: dict[tuple, Plan] = {}
        self._buffers: dict[tuple, Buffer] = {}
        # (plan id, sole attribution) pairs checked against autograd, and the steps of each
        # since its last check (cleared with the plans: ids stay theirs)
        self.verified: dict[tuple[int, tuple[tuple[int, int], ...]], int] = {}
        # ids of the plans whose graph walk found no parameter one task alone reaches: they
        # stop walking (a walk costs about one autograd call's; skipping it is always safe)
        self.without_sole: set[int] = set()

    def __getstate__(self) -> dict:
        """A copy starts with no plans: they are keyed by the ids of the parameters."""
        state = self.__dict__.copy()
        state.update(_plans={}, _buffers={}, verified={}, without_sole=set())
        return state

    def plan(
        self,
        params: Sequence[Tensor],
        sizes: list[int],
        calls: dict[nn.Module, list[Call]],
        slow: set[nn.Module],
        owned: dict[nn.Module, list[tuple[str, nn.Parameter]]],
    ) -> tuple[tuple, Plan]:
        """The pattern's key and its plan (made on the first step of the pattern)."""
        key = (
            tuple(map(id, params)),
            tuple(sizes),
            tuple(calls),
            tuple([c.input.shape for cs in calls.values() for c in cs]),
            frozenset(slow),
        )
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self.clear()
            plan = self._plans[key] = make_plan(
                params, sizes, calls, slow, owned, self.factored, self.trust_ambiguous
            )
        return key, plan

    def check_due(self, pattern: tuple, every: int | None) -> bool:
        """Whether ``pattern``'s step is checked: never checked yet (or its check could not
        judge), or ``every`` steps since its last check; counts the step otherwise."""
        since = self.verified.get(pattern)
        if since is None:
            return True
        if every is None:
            return False
        since = self.verified[pattern] = since + 1
        return since >= every

    def buffer(self, key: tuple, plan: Plan, like: Tensor, num_tasks: int, reuse: bool) -> Buffer:
        """The matrix to fill: the pattern's last one under ``reuse``, else a fresh one."""
        buffer = self._buffers.get(key) if reuse else None
        if buffer is None:
            buffer = Buffer.allocate(plan, like, num_tasks)
            if reuse:
                self._buffers[key] = buffer
        return buffer

    def clear(self) -> None:
        self._plans.clear()
        self._buffers.clear()
        self.verified.clear()
        self.without_sole.clear()


def make_plan(
    params: Sequence[Tensor],
    sizes: list[int],
    calls: dict[nn.Module, list[Call]],
    slow: set[nn.Module],
    owned: dict[nn.Module, list[tuple[str, nn.Parameter]]],
    factored: str,
    trust_ambiguous: bool,
) -> Plan:
    """Which parameters take the fast path, which are factored, where each one goes.

    ``trust_ambiguous``: let a layer whose input has the batch size in more than one
    dimension take the fast path (the engine then checks the plan against autograd).
    """
    _refuse_complex(params)
    column = {id(p): k for k, p in enumerate(params)}
    slow_layers: dict[nn.Module, str] = {m: "its calls are not safe to split" for m in slow}
    ambiguous: dict[nn.Module, str] = {}
    fast = []
    for module, module_calls in calls.items():
        if module in slow or not any(id(p) in column for _, p in owned[module]):
            continue  # slow already, or none of its parameters is asked for
        reason, doubt = _batch_dimension(module, module_calls, sum(sizes))
        if doubt is not None and not trust_ambiguous:
            reason = doubt + " and verify='never' cannot confirm which is the batch"
        if reason is not None:
            slow_layers[module] = reason
            continue
        if doubt is not None:
            ambiguous[module] = doubt
        fast.append(module)
    # A parameter shared by two fast layers (weight tying) is a sum of two dense blocks.
    users: dict[int, int] = {}
    for module in fast:
        for _, p in owned[module]:
            users[id(p)] = users.get(id(p), 0) + 1
    rules = {module: LAYERS[type(module)] for module in fast}
    factored_weight = {
        module: column[id(module.weight)]
        for module in fast
        if rules[module].factorable
        and id(module.weight) in column
        and users[id(module.weight)] == 1
        and _keep_factored(
            module, sum(c.input.numel() for c in calls[module]), len(sizes), factored
        )
    }
    targets = {
        module: [
            (name, column[id(p)])
            for name, p in owned[module]
            if id(p) in column and column[id(p)] != factored_weight.get(module)
        ]
        for module in fast
    }
    in_place = {  # dense parameters of the matrix's dtype: written with no copy
        module: [
            (name, column[id(p)], tuple(p.shape))
            for name, p in owned[module]
            if (name, column.get(id(p))) in targets[module]
        ]
        for module in fast
        if rules[module].in_place and all(p.dtype == params[0].dtype for _, p in owned[module])
    }
    fast_columns = {k for module_targets in targets.values() for _, k in module_targets}
    factored_columns = set(factored_weight.values())
    dense = [k for k in range(len(params)) if k not in factored_columns]
    fast_reached = np.zeros(len(params), dtype=bool)
    fast_reached[sorted(fast_columns | factored_columns)] = True
    return Plan(
        fast=fast,
        formulas={module: rules[module].task_grads for module in fast},
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
        slow_layers=slow_layers,
        ambiguous=ambiguous,
    )


def _batch_dimension(
    module: nn.Module, calls: list[Call], batch: int
) -> tuple[str | None, str | None]:
    """Whether dim 0 of every call's input is the batch of ``batch`` rows.

    Returns ``(reason, doubt)``: why the layer must take the slow path (``None`` if it may
    take the fast one), and why dim 0 is only probably the batch (``None`` if certainly).
    The fast path reads dim 0 as the batch; a time-major input (``nn.LSTM``, ``nn.GRU``,
    ``nn.TransformerEncoderLayer`` with their default ``batch_first=False``) has the batch in
    dim 1, and when its sequence length equals the batch size, dim 0 alone cannot tell.
    """
    rule = LAYERS.get(type(module))
    if rule is None:
        return f"it is now a {type(module).__name__} (a parametrization)", None
    reason = rule.why_slow(module)
    if reason is not None:
        return reason, None
    doubt = None
    for call in calls:
        shape = call.input.shape
        dims = rule.batch_dims(module, call.input)
        if len(dims) == 0 or dims[0] != 0:
            return f"its input {tuple(shape)} has no batch dimension", None
        if shape[0] != batch:
            return f"its input {tuple(shape)} has {shape[0]} rows, not {batch}", None
        if any(shape[d] == batch for d in dims[1:]):
            doubt = (
                f"its input {tuple(shape)} has the batch size {batch} in more than one "
                "dimension (a time-major input, batch_first=False, reads dim 1 as the batch)"
            )
    return None, doubt


def _refuse_complex(params: Sequence[Tensor]) -> None:
    complex_params = [k for k, p in enumerate(params) if p.is_complex()]
    if complex_params:
        raise TypeError(
            f"parameter(s) {complex_params} are complex ({params[complex_params[0]].dtype}), "
            "which is not supported: the methods compare task gradients by real dot "
            "products; keep the real and imaginary parts as two real parameters"
        )


def _keep_factored(layer: nn.Module, input_numel: int, num_tasks: int, factored: str) -> bool:
    """Whether to keep a Linear layer's per-task weight gradients factored.

    ``"auto"`` compares the two costs. Factored: an ``[M, M]`` kernel from the inputs and
    output gradients, reduced to ``[T, T]``. Dense: ``T`` per-task ``[out, in]`` gradients,
    their Gramian and their combination.
    """
    if factored != "auto":
        return factored == "always"
    fan_out, fan_in = layer._parameters["weight"].shape
    rows = input_numel // fan_in
    factored_cost = rows * rows * (fan_in + fan_out + num_tasks)
    dense_cost = num_tasks * (num_tasks + 1) * fan_in * fan_out
    return factored_cost < dense_cost
