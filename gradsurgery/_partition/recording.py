"""Recording a forward pass for the batch-partition engine, and the checks that keep it safe.

Forward hooks on the registered layers keep every call made inside ``engine.record()``: its
input and output, which the single backward pass reads. Before the gradients are computed,
the recording is checked: a call the engine could not attribute to tasks, a parameter also
used outside its layer's calls, or an input or output changed in place after the call sends
that layer to the slow per-task path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._autograd import graph_leaves
from .layers import LAYERS

try:
    from torch.compiler import is_compiling  # public from torch 2.3
except ImportError:  # torch 2.2
    from torch._dynamo import is_compiling

# Autograd nodes of batch normalization: in training mode over more than one sample, each
# sample's output depends on every other sample of the batch. (InstanceNorm runs batch
# normalization over a batch of one, which does not mix samples.)
_BATCH_NORM_NODES = frozenset(
    getattr(torch._C._functions, name)
    for name in dir(torch._C._functions)
    if "BatchNorm" in name and "NoTraining" not in name and "NoUpdate" not in name
)


_GONE = object()  # a layer slot that no longer holds the parameter the engine read


class Call(NamedTuple):
    """One recorded forward call of a registered layer."""

    input: Tensor  # as passed, in the autograd graph (indices for an Embedding)
    output: Tensor  # in the autograd graph
    versions: tuple[int, int]  # of input and output when recorded: an in-place change shows

    def modified(self) -> bool:
        """Whether the input or the output was changed in place after the call."""
        return (self.input._version, self.output._version) != self.versions


def refuse_sample_mixing_layers(model: nn.Module) -> None:
    """Raise if ``model`` holds a layer that mixes the batch's samples (BatchNorm)."""
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


class Recorder:
    """The hooks on a model's registered layers and what they recorded since the last step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.task_sizes: list[int] | None = None
        self.recording = False
        self.compiled = False  # a hooked layer ran inside a torch.compile graph
        self.calls: dict[nn.Module, list[Call]] = {}
        self.unrecorded: set[nn.Module] = set()
        self.warned: set[nn.Module] = set()  # layers found unsafe (warned about once)
        self.replaced = False  # a recording replaced another before its backward
        self.changed = False  # a layer changed since the plans were made: forget them
        # Exact types: a subclass may override ``forward`` and break the gradient formulas.
        layers = [module for module in model.modules() if type(module) in LAYERS]
        self.owned: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
        self.owner: dict[int, nn.Module] = {}
        # Each layer's type and parameter slots, checked at every step: a parametrization,
        # weight_norm, spectral_norm or weight tying done after the engine was created
        # changes one of them.
        self.layout: dict[nn.Module, tuple[type, list[int]]] = {}
        # Whether a layer's parameters are the direct inputs of its call, as the gradient
        # formulas need: the graph walk steps over only those layers' calls. A computed
        # weight (a parametrization) must be walked through to find what it is computed from.
        self.direct: dict[nn.Module, bool] = {}
        for module in layers:
            self._inspect(module)
        self._handles = [
            module.register_forward_hook(self.on_forward, with_kwargs=True) for module in layers
        ]

    def _inspect(self, module: nn.Module) -> None:
        """Read (again) which parameters a layer holds."""
        for _, p in self.owned.get(module, ()):
            if self.owner.get(id(p)) is module:
                del self.owner[id(p)]
        self.owned[module] = list(module.named_parameters(recurse=False))
        self.owner.update((id(p), module) for _, p in self.owned[module])
        self.layout[module] = (type(module), list(map(id, module._parameters.values())))
        rule = LAYERS.get(type(module))
        self.direct[module] = rule is not None and module._parameters.keys() == rule.parameters

    def __getstate__(self) -> dict[str, Any]:
        """The state to copy: parameters by reference, so that a deep copy made together with
        the model refers to the copied parameters (the ids kept for speed would not).

        A recorded forward pass not yet differentiated is not copied: the copy records anew.
        """
        state = self.__dict__.copy()
        by_id: dict[int, Any] = {id(None): None}
        by_id.update((id(p), p) for params in self.owned.values() for _, p in params)
        state["layout"] = {
            module: (kind, [by_id.get(slot, _GONE) for slot in slots])
            for module, (kind, slots) in self.layout.items()
        }
        del state["owner"]
        state["calls"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        layout = state.pop("layout")
        self.__dict__.update(state)
        self.layout = {
            module: (kind, [id(p) for p in slots]) for module, (kind, slots) in layout.items()
        }
        self.owner = {id(p): module for module, params in self.owned.items() for _, p in params}

    def remove(self) -> None:
        """Remove the hooks and forget the recorded calls."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.calls = {}

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad:  # also under no_grad
            return
        if is_compiling():
            # Traced by torch.compile, this hook would record tensors the compiled graph
            # returns, not the ones its backward runs through. Dynamo replays this flag.
            self.compiled = True
            return
        x = args[0] if args else kwargs.get("input")
        if not self.recording or not isinstance(x, Tensor):
            # A call the engine cannot attribute to tasks: its module takes the slow path.
            self.unrecorded.add(module)
            return
        versions = (x._version, output._version)
        self.calls.setdefault(module, []).append(Call(x, output, versions))

    def take(
        self, losses: Sequence[Tensor]
    ) -> tuple[dict[nn.Module, list[Call]], set[nn.Module], list[Tensor]]:
        """The recorded calls (forgotten here), the layers that must take the slow path, and
        the leaves the losses reach outside the recorded calls."""
        if self.compiled:
            raise RuntimeError(
                "BatchPartitionEngine cannot record a model run by torch.compile: the compiled "
                "graph hides its layers' outputs from autograd. Use the default engine "
                "(engine=None), which works with compiled models, or run the model uncompiled"
            )
        if self.task_sizes is None or not self.calls:
            raise RuntimeError(self._nothing_recorded(losses))
        if len(losses) != len(self.task_sizes):
            raise ValueError(
                f"{len(losses)} losses for a batch recorded with {len(self.task_sizes)} tasks "
                f"(task_sizes={self.task_sizes})"
            )
        calls, self.calls = self.calls, {}
        layout = self.layout
        for module in calls:
            kind, slots = layout[module]
            if type(module) is not kind or list(map(id, module._parameters.values())) != slots:
                self._changed(module)
        unrecorded = self.unrecorded
        if unrecorded:  # the usual step has none: no set operations
            self.unrecorded = set()
        if unrecorded and unrecorded & calls.keys():
            warnings.warn(
                "BatchPartitionEngine: "
                + self._names(unrecorded & calls.keys())
                + " ran with grad enabled outside engine.record() since the last backward; "
                "their parameters took the slow per-task path this step",
                stacklevel=4,
            )
        replaced, self.replaced = self.replaced, False
        unsafe, leaves = self._unsafe_layers(losses, calls, replaced)
        slow = (unrecorded | unsafe) & calls.keys() if unrecorded or unsafe else set()
        return calls, slow, leaves

    def _changed(self, module: nn.Module) -> None:
        """A layer's type or parameters changed since the engine last read them."""
        before = self.layout[module][0]
        self._inspect(module)
        self.changed = True
        rule = LAYERS.get(type(module))
        reason = (
            f"it is now a {type(module).__name__} (a parametrization)"
            if rule is None
            else rule.why_slow(module)
        )
        what = (
            f"its parameters take the slow per-task path: {reason}"
            if reason
            else "the fast path follows its new parameters (weight tying)"
        )
        warnings.warn(
            f"BatchPartitionEngine: {self._names({module})} ({before.__name__}) changed since "
            f"the engine read it; {what}",
            stacklevel=5,
        )

    def _nothing_recorded(self, losses: Sequence[Tensor]) -> str:
        """Why no call was recorded, as precisely as the engine can tell."""
        fix = "run the model inside `with engine.record(task_sizes):` before the backward"
        if self.task_sizes is None:
            return f"BatchPartitionEngine recorded no forward pass: {fix}"
        if not self.owned:
            return (
                f"BatchPartitionEngine: the model it was built on ({type(self.model).__name__}) "
                "has no layer it records (nn.Linear, nn.Embedding, nn.LayerNorm): use the "
                "default engine (engine=None)"
            )
        own = {id(p) for p in self.model.parameters()}
        if not any(id(leaf) in own for leaf in graph_leaves(losses)):
            return (
                "BatchPartitionEngine recorded no forward pass of its model: the losses do not "
                f"depend on the model the engine was built on ({type(self.model).__name__}); "
                "build the engine on the model that computes the losses"
            )
        if self.unrecorded:
            return (
                f"BatchPartitionEngine recorded no forward pass: {self._names(self.unrecorded)} "
                f"ran outside engine.record() and nothing ran inside it; {fix}"
            )
        return (
            "BatchPartitionEngine recorded no forward pass: no layer ran with grad enabled "
            "inside engine.record(), or torch.compile skipped the engine's hooks (use the "
            "default engine with a compiled model)"
        )

    def _unsafe_layers(
        self, losses: Sequence[Tensor], calls: dict[nn.Module, list[Call]], replaced: bool
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
        direct = self.direct
        bypass = {
            c.output.grad_fn: c.input.grad_fn
            for module, cs in calls.items()
            if module not in unsafe and direct[module]
            for c in cs
        }
        batch_norms: list[Any] = []
        leaves = graph_leaves(losses, bypass, _BATCH_NORM_NODES, batch_norms)
        if batch_norms:
            self._refuse_batch_statistics(batch_norms)
        leaves += [
            c.input
            for cs in calls.values()
            for c in cs
            if c.input.grad_fn is None and c.input.requires_grad
        ]
        for leaf in leaves:  # the second kind: a layer parameter fed to a recorded call
            module = self.owner.get(id(leaf))
            # Layers without recorded calls, or not stepped over, take the slow path anyway.
            if module in calls and direct[module]:
                unsafe.add(module)
        if unsafe and replaced:
            warnings.warn(
                "BatchPartitionEngine: engine.record() was entered again before the backward "
                "of the forward pass it had recorded, whose calls it dropped; the losses also "
                f"read that first forward pass, so {self._names(unsafe)} take the slow "
                "per-task path this step. Record a step's whole forward pass in one "
                "`with engine.record(task_sizes):` block",
                stacklevel=5,
            )
        elif unsafe - self.warned:
            self.warned |= unsafe
            warnings.warn(
                "BatchPartitionEngine: "
                + self._names(unsafe)
                + ": a parameter is also used outside the layer's calls (weight tying, a "
                "penalty in the loss) or the layer's input or output was changed in place; "
                "these layers take the slow per-task path",
                stacklevel=5,
            )
        return unsafe, leaves

    def _refuse_batch_statistics(self, nodes: list[Any]) -> None:
        """Raise if a batch normalization in training mode mixed the batch's samples."""
        for node in nodes:
            saved = getattr(node, "_saved_input", None)
            if getattr(node, "_saved_training", True) and (saved is None or saved.shape[0] > 1):
                layers = [
                    name
                    for name, module in self.model.named_modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm)
                ]
                where = (
                    f" ({', '.join(layers)}, added after the engine was created)" if layers else ""
                )
                raise ValueError(
                    f"BatchPartitionEngine: a batch normalization in training mode{where} ran "
                    "in the recorded forward pass; it mixes the samples of different tasks, so "
                    "one backward pass cannot separate their gradients. Use the default engine "
                    "(engine=None), or a per-sample normalization (nn.LayerNorm, nn.GroupNorm)"
                )

    def _names(self, modules: set[nn.Module]) -> str:
        names = {module: name for name, module in self.model.named_modules()}
        return ", ".join(sorted(names.get(m, type(m).__name__) for m in modules))


class Recording:
    """The context :meth:`BatchPartitionEngine.record` returns.

    A class rather than ``contextlib.contextmanager``: a generator-based context costs several
    microseconds, and a training loop enters this one at every step.
    """

    __slots__ = ("engine", "recorder", "sizes")

    def __init__(self, recorder: Recorder, sizes: list[int], engine: object) -> None:
        self.recorder, self.sizes, self.engine = recorder, sizes, engine

    def __enter__(self):  # -> the engine (typed by the engine's record())
        recorder = self.recorder
        if recorder.calls:  # recorded, and not yet taken by a backward
            recorder.replaced = True
        recorder.task_sizes = self.sizes
        recorder.calls = {}
        recorder.compiled = False
        recorder.recording = True
        return self.engine

    def __exit__(self, *exc_info: object) -> None:
        self.recorder.recording = False
