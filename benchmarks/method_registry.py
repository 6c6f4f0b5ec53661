"""Every multi-task method this gradsurgery has, by name, for the benchmarks that compare them.

The registry is built when it is read: each :class:`~gradsurgery._weighting.Method` subclass
found in ``gradsurgery.methods`` (one module per method) joins it under its class name, with
the hyper-parameters of :data:`SETTINGS` where the papers' benchmarks fix them and the
method's defaults otherwise. The plain mean of the losses is always there, and the PCGrad and
GradNorm classes of gradsurgery's first API join it for as long as they are not ``Method``
subclasses themselves.

Each entry builds, for one model, a training step of the usual shape::

    step = entry.training_step(optimizer, shared_parameters, num_tasks)
    step.zero_grad(); step.backward(losses); step.step()

and, for a :class:`Method`, the method object alone (``entry.build_method(num_tasks)``), which
the toy benchmark drives on many independent problems at once.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import gradsurgery as gs
from gradsurgery._weighting import Method

# Hyper-parameters that differ from a method's defaults, as the benchmarks' reference papers
# set them (keyed by class name; passed only if the constructor takes them).
SETTINGS: dict[str, dict[str, Any]] = {
    "CAGrad": {"c": 0.5},  # CAGrad paper, toy problem and MultiMNIST-style experiments
}

# Methods that are a baseline of their own rather than a method to compare: fixed weights are
# the tuned baseline (:func:`fixed_weights_entry`), equal fixed weights are the mean.
NOT_LISTED = {"LinearScalarization"}

# The order of the tables and figures: the baselines first, then the papers' order.
PREFERRED_ORDER = [
    "Mean", "PCGrad", "GradNorm", "MGDA", "CAGrad", "NashMTL", "IMTLG", "AlignedMTL", "UPGrad",
    "DualProj", "FairGrad", "ConFIG", "GradVac", "GradDrop", "UW", "DWA", "RLW", "GLS", "IMTLL",
    "FAMO", "DBMTL", "STCH",
]  # fmt: skip


class TrainingStep:
    """``zero_grad`` / ``backward(losses)`` / ``step`` around one optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def backward(self, losses: Sequence[Tensor]) -> object:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.step()

    def end_epoch(self) -> None:
        """Tell a method whose weights follow epochs (DWA, STCH) that one ended."""
        method = getattr(self, "method", None)
        if hasattr(method, "end_epoch"):
            method.end_epoch()


class _MeanStep(TrainingStep):
    def backward(self, losses: Sequence[Tensor]) -> None:
        (sum(losses) / len(losses)).backward()


class _FixedWeightsStep(TrainingStep):
    def __init__(self, optimizer: torch.optim.Optimizer, weights: Sequence[float]) -> None:
        super().__init__(optimizer)
        self.weights = list(weights)

    def backward(self, losses: Sequence[Tensor]) -> None:
        sum(w * loss for w, loss in zip(self.weights, losses, strict=True)).backward()


class _WrapperStep(TrainingStep):
    """A gradsurgery object that replaces ``backward`` (and, for a wrapper, the optimizer)."""

    def __init__(
        self, optimizer: Any, backward: Callable[[Sequence[Tensor]], object], method: Any = None
    ) -> None:
        super().__init__(optimizer)
        self._backward = backward
        self.method = method

    def backward(self, losses: Sequence[Tensor], **options: Any) -> object:
        return self._backward(list(losses), **options)


@dataclass(frozen=True)
class MethodEntry:
    """One benchmarked method."""

    name: str
    training_step: Callable[[torch.optim.Optimizer, list[Tensor], int], TrainingStep]
    build_method: Callable[[int], Method] | None = None  # for Method subclasses
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the implementation lives


def _constructor_options(cls: type, num_tasks: int, options: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(cls).parameters
    chosen = {key: value for key, value in options.items() if key in parameters}
    for name in ("num_tasks", "n_tasks"):
        if name in parameters:
            chosen[name] = num_tasks
    return chosen


def _method_entry(cls: type[Method], module: str, overrides: Mapping[str, dict]) -> MethodEntry:
    options = {**SETTINGS.get(cls.__name__, {}), **overrides.get(cls.__name__, {})}

    def build_method(num_tasks: int) -> Method:
        return cls(**_constructor_options(cls, num_tasks, options))

    def training_step(optimizer: torch.optim.Optimizer, shared: list[Tensor], num_tasks: int):
        if not hasattr(gs, "MultiTaskOptimizer"):
            raise RuntimeError("this gradsurgery has no MultiTaskOptimizer to train a Method with")
        method = build_method(num_tasks)
        extra = list(method.parameters()) if hasattr(method, "parameters") else []
        if extra:  # a method's own learned parameters (e.g. log-variances) join the optimizer
            optimizer.add_param_group({"params": extra})
        wrapper = gs.MultiTaskOptimizer(optimizer, method)
        return _WrapperStep(wrapper, wrapper.backward, method)

    return MethodEntry(cls.__name__, training_step, build_method, options, module)


def _builds(entry: MethodEntry) -> bool:
    try:
        entry.build_method(2)
    except Exception:  # a method this benchmark cannot build is left out
        return False
    return True


def _discover_methods(overrides: Mapping[str, dict]) -> dict[str, MethodEntry]:
    try:
        package = importlib.import_module("gradsurgery.methods")
    except ImportError:
        return {}
    found: dict[str, MethodEntry] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            defined_here = cls.__module__ == module.__name__
            if defined_here and issubclass(cls, Method) and cls.__name__ not in NOT_LISTED:
                found[cls.__name__] = _method_entry(cls, module.__name__, overrides)
    return {name: entry for name, entry in found.items() if _builds(entry)}


def _legacy_entries() -> dict[str, MethodEntry]:
    """gradsurgery's first API: a PCGrad optimizer wrapper and a GradNorm weighter."""
    entries = {}
    if not issubclass(gs.PCGrad, Method):

        def pcgrad_step(optimizer, shared, num_tasks):
            wrapper = gs.PCGrad(optimizer)
            return _WrapperStep(wrapper, wrapper.pc_backward)

        entries["PCGrad"] = MethodEntry("PCGrad", pcgrad_step, source="gradsurgery.PCGrad")
    if not issubclass(gs.GradNorm, Method):

        def gradnorm_step(optimizer, shared, num_tasks):
            weighter = gs.GradNorm(num_tasks, shared, alpha=1.5, lr=0.01)
            return _WrapperStep(optimizer, weighter.backward)

        entries["GradNorm"] = MethodEntry(
            "GradNorm", gradnorm_step, options={"alpha": 1.5, "lr": 0.01},
            source="gradsurgery.GradNorm",
        )  # fmt: skip
    return entries


def mean_entry() -> MethodEntry:
    return MethodEntry("Mean", lambda optimizer, shared, num_tasks: _MeanStep(optimizer))


def fixed_weights_entry(weights: Iterable[float]) -> MethodEntry:
    """Descend ``sum_i weights[i] * L_i`` (one backward pass, no method object)."""
    weights = [float(w) for w in weights]
    label = "Fixed(" + ", ".join(f"{w:g}" for w in weights) + ")"
    return MethodEntry(
        label, lambda optimizer, shared, num_tasks: _FixedWeightsStep(optimizer, weights),
        options={"weights": weights}, source="sum(w * loss).backward()",
    )  # fmt: skip


def available_methods(overrides: Mapping[str, dict] | None = None) -> dict[str, MethodEntry]:
    """Every method of this gradsurgery, the mean first, in :data:`PREFERRED_ORDER`.

    ``overrides`` (class name -> constructor options) adapt a method to a benchmark.
    """
    entries = {**_legacy_entries(), **_discover_methods(overrides or {})}
    entries["Mean"] = mean_entry()  # one backward of the mean, whatever Mean class exists
    rank = {name: i for i, name in enumerate(PREFERRED_ORDER)}
    return dict(sorted(entries.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def select(
    names: Iterable[str] | None, overrides: Mapping[str, dict] | None = None
) -> dict[str, MethodEntry]:
    """The entries named (all when ``None``); an unknown name is an error listing the known."""
    entries = available_methods(overrides)
    if names is None:
        return entries
    names = list(names)
    unknown = [name for name in names if name not in entries]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; this gradsurgery has {list(entries)}")
    return {name: entries[name] for name in names}
