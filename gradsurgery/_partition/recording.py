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
from typing import NamedTuple

from torch import Tensor, nn

from .._autograd import graph_leaves
from .layers import LAYERS

try:
    from torch.compiler import is_compiling  # public from torch 2.3
except ImportError:  # torch 2.2
    from torch._dynamo import is_compiling


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
        # Exact types: a subclass may override ``forward`` and break the gradient formulas.
        layers = [module for module in model.modules() if type(module) in LAYERS]
        self.owned = {m: list(m.named_parameters(recurse=False)) for m in layers}
        self.owner = {id(p): m for m, owned in self.owned.items() for _, p in owned}
        self._handles = [
            module.register_forward_hook(self.on_forward, with_kwargs=True) for module in layers
        ]

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
            raise RuntimeError(
                "BatchPartitionEngine recorded no forward pass: run the model inside "
                "`with engine.record(task_sizes):` before the backward (a model compiled by "
                "torch.compile may skip the engine's hooks: use the default engine with it)"
            )
        if len(losses) != len(self.task_sizes):
            raise ValueError(
                f"{len(losses)} losses for a batch recorded with {len(self.task_sizes)} tasks "
                f"(task_sizes={self.task_sizes})"
            )
        calls, self.calls = self.calls, {}
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
        unsafe, leaves = self._unsafe_layers(losses, calls)
        slow = (unrecorded | unsafe) & calls.keys() if unrecorded or unsafe else set()
        return calls, slow, leaves

    def _unsafe_layers(
        self, losses: Sequence[Tensor], calls: dict[nn.Module, list[Call]]
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
            module = self.owner.get(id(leaf))
            if module in calls:  # layers without recorded calls take the slow path anyway
                unsafe.add(module)
        if unsafe - self.warned:
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
        recorder.task_sizes = self.sizes
        recorder.calls = {}
        recorder.compiled = False
        recorder.recording = True
        return self.engine

    def __exit__(self, *exc_info: object) -> None:
        self.recorder.recording = False
