"""The public shapes of every method: an optimizer wrapper, and GradNorm's stand-alone weighter.

:class:`MultiTaskOptimizer` wraps any ``torch.optim`` optimizer and runs one method through
the update pipeline; :func:`wrapper_class` makes the per-method public classes
(``gs.PCGrad(optimizer, reduction="sum")``) from a method class's hyper-parameters.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._info import GradNormInfo, StepInfo
from ._jacobian import Engine
from ._representation import representation_step
from ._step import UpdatePipeline
from ._validation import (
    as_parameter_list,
    check_engine,
    check_nonfinite_policy,
    check_num_tasks,
    check_real_parameters,
)
from ._weighting import Method
from .methods.gradnorm import GradNorm as GradNormMethod

__all__ = ["GradNorm", "MultiTaskOptimizer", "wrapper_class"]

_OPTIONS_DOC = """\
shared_parameters : module or iterable of Tensor, optional
    The parameters whose task gradients the method reads. By default, those that every
    task's autograd graph reaches. The others (task-specific heads) get what the method's
    ``unshared`` rule says: the same weighted combination, or the plain mean (or sum) of the
    gradients of the tasks that reach them.
engine : BatchPartitionEngine, optional
    How the per-task gradients are computed: one autograd call per task by default, or one
    backward pass over a task-partitioned batch (see :class:`BatchPartitionEngine`).
nonfinite : {"raise", "skip"}
    What a NaN or Inf in a loss or gradient (or in what would be written) does: raise
    :class:`NonFiniteError` (default), or skip the update and the next :meth:`step`,
    reported as ``info.skipped``. Either way, ``.grad`` and all state are left as they were.
num_tasks : int, optional
    Number of tasks; by default fixed by the first :meth:`backward` call. Every call must
    pass that many losses.
distributed : bool, optional
    Average the per-task gradients and losses over the processes of ``process_group`` (one
    all-reduce per step) before the method decides, so every process applies the update of
    the global batch. ``None`` (default): whenever torch.distributed is initialized with more
    than one process.
process_group : torch.distributed.ProcessGroup, optional
    The group to synchronize over; the default group when ``None``. At the first
    synchronized step every process takes the random generator state of the group's first
    process, so all of them draw the same numbers."""


class MultiTaskOptimizer(torch.optim.Optimizer):
    """Any ``torch.optim`` optimizer, with a multi-task method combining the task gradients.

    The wrapper behaves as the optimizer it wraps (``param_groups``, ``state``,
    ``zero_grad``, ``step``, ``add_param_group``, hooks, learning-rate schedulers, ``copy``,
    ``pickle``); :meth:`backward` takes the place of ``loss.backward()``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to wrap; its parameters are the ones the method writes ``.grad`` into.
    method : Method
        The method, e.g. ``gs.methods.PCGrad()``; see :doc:`/guide/custom_method` to write one.
        A method with learned parameters (:class:`~gradsurgery.methods.uw.UW`,
        :class:`~gradsurgery.methods.imtl_l.IMTLL`: ``method.parameters()``) has those the optimizer
        does not hold yet added to it, with the optimizer's defaults (into the first parameter
        group that has them, else as a new group); to give them other settings, put them in
        the optimizer yourself first.
    {options}

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gs.methods.Mean())
    >>> out = model(torch.randn(8, 4))
    >>> opt.zero_grad()
    >>> info = opt.backward([out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()])
    >>> opt.step()
    >>> info.weights
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    __doc__ = __doc__.replace("{options}", _OPTIONS_DOC.replace("\n", "\n    "))

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: Method,
        *,
        shared_parameters: Iterable[Tensor] | nn.Module | None = None,
        engine: Engine | None = None,
        nonfinite: str = "raise",
        num_tasks: int | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        # torch.optim.Optimizer.__init__ is deliberately not called: the wrapper owns no
        # parameters, state or hooks of its own, it shares those of the wrapped optimizer.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError(
                f"optimizer is already a {type(optimizer).__name__}: wrap the plain optimizer"
            )
        if not isinstance(method, Method):
            raise TypeError(
                "method must be a gradsurgery Method (e.g. gs.methods.PCGrad()), got "
                f"{type(method).__name__}"
            )
        params = _optimized(optimizer)
        check_real_parameters(params, "the optimizer")
        shared = None
        if shared_parameters is not None:
            shared = as_parameter_list(shared_parameters, "shared_parameters")
            check_real_parameters(shared, "shared_parameters")
            optimized = {id(p) for p in params}
            outside = [k for k, p in enumerate(shared) if id(p) not in optimized]
            if outside:
                raise ValueError(
                    f"shared_parameters holds {len(outside)} tensor(s) that the wrapped optimizer "
                    f"does not optimize (positions {outside[:5]}): add them to the optimizer, "
                    "or leave them out of shared_parameters"
                )
        check_engine(engine)
        _check_dense_layers(engine, shared_parameters)
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        _add_method_parameters(optimizer, method, params)
        self.optimizer = optimizer
        self.method = method
        self._pipeline = UpdatePipeline(
            method,
            engine=engine,
            shared=shared,
            nonfinite=check_nonfinite_policy(nonfinite),
            num_tasks=None if num_tasks is None else check_num_tasks(num_tasks),
            distributed=distributed,
            process_group=process_group,
        )
        self._skip_next_step = False

    # -- the update ------------------------------------------------------------------------------
    def backward(
        self,
        losses: Sequence[Tensor],
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        representation: Tensor | Sequence[Tensor] | None = None,
        representation_batch: str = "samples",
    ) -> StepInfo:
        """Write the method's combination of the task gradients into ``.grad``.

        Like ``loss.backward()``, the result is added to ``.grad`` (call :meth:`zero_grad`
        first) and the autograd graph is freed.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Scale the losses with it (mixed precision). The method and the info see the
            unscaled gradients; non-finite gradients are written as they are, for
            ``grad_scaler.step`` to skip the step and lower the scale.
        representation : Tensor or sequence of Tensor, optional
            Representation mode (see :doc:`/guide/shared_input`): the shared encoder's output,
            as the heads read it. The method decides from the task gradients of this tensor
            (taken through the heads only), and their combination is backpropagated through
            the encoder in one pass. ``None`` (default): the exact task gradients of the
            parameters.
        representation_batch : {"samples", "sum"}
            How representation mode's Gramian treats the batch (first) dimension:
            ``"samples"`` (default) flattens each representation gradient whole, so a dot
            product is the sum over the batch of per-sample dot products (MGDA-UB's authors);
            ``"sum"`` sums each gradient over the batch first (LibMTL's ``rep_grad``).

        Returns
        -------
        StepInfo
            What the step saw and did (the method's subclass of it).

        Raises
        ------
        ValueError, TypeError
            On bad input; nothing is changed.
        NonFiniteError
            On a NaN or Inf loss, gradient or update with ``nonfinite="raise"``; nothing is
            changed.
        """
        # The method's own parameters get their gradient from the method's decision, not
        # from the task losses: the engine never sees them.
        groups = self.optimizer.param_groups
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        own = _method_parameters(self.method)
        if own:
            own_ids = {id(p) for p in own}
            params = [p for p in params if id(p) not in own_ids]
        if representation is None:
            if representation_batch != "samples":
                raise ValueError("representation_batch is only read with representation=")
            info, skip = self._pipeline.run(losses, params, grad_scaler=grad_scaler)
        else:
            info, skip = representation_step(
                self._pipeline,
                losses,
                representation,
                params,
                grad_scaler=grad_scaler,
                batch=representation_batch,
            )
        self._skip_next_step = skip
        return info

    @property
    def weights(self) -> torch.Tensor | None:
        """The task weights of the last update (``None`` before the first)."""
        weights = self._pipeline.last_weights
        return None if weights is None else torch.tensor(weights, dtype=torch.float64)

    @property
    def engine(self) -> Engine:
        return self._pipeline.engine

    @property
    def nonfinite(self) -> str:
        return self._pipeline.nonfinite

    @property
    def num_tasks(self) -> int | None:
        return self._pipeline.num_tasks

    @property
    def distributed(self) -> bool | None:
        return self._pipeline.distributed

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._pipeline.process_group

    # -- the torch.optim.Optimizer protocol, delegated to the wrapped optimizer --------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the wrapped optimizer, unless the last :meth:`backward` was skipped."""
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step(closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        params = param_group.get("params", []) if isinstance(param_group, Mapping) else []
        params = [params] if isinstance(params, Tensor) else list(params)
        check_real_parameters([p for p in params if isinstance(p, Tensor)], "param_group")
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        """Register a hook run before each step of the wrapped optimizer (it receives the
        wrapped optimizer)."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> Any:
        """Register a hook run after each step of the wrapped optimizer."""
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register a hook run before the wrapped optimizer's ``state_dict``."""
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> Any:
        """Register a hook run on the wrapped optimizer's ``state_dict`` (the ``"optimizer"``
        entry of :meth:`state_dict`)."""
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        """Register a hook run before the wrapped optimizer loads its part of a state dict."""
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> Any:
        """Register a hook run after the wrapped optimizer loaded its part of a state dict."""
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's state and its random generator's."""
        generator = self.method.generator
        return {
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "generator": None if generator is None else generator.get_state(),
            "num_tasks": self._pipeline.num_tasks,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a resumed run continues bit-for-bit.

        Everything is checked before anything changes: a refused state dict leaves the
        optimizer, the method and the generator as they were.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = {"optimizer", "num_tasks"} - state_dict.keys()
        if missing:
            raise KeyError(f"not a {type(self).__name__} state_dict: missing {sorted(missing)}")
        if "method" in state_dict:
            method_state = state_dict["method"]
        else:  # the earlier layout kept the method's entries at the top level
            wrapper_keys = ("optimizer", "generator", "num_tasks")
            method_state = {k: v for k, v in state_dict.items() if k not in wrapper_keys}
        num_tasks = state_dict["num_tasks"]
        if num_tasks is not None:
            check_num_tasks(num_tasks)
            if self.num_tasks is not None and num_tasks != self.num_tasks:
                raise ValueError(
                    f"state_dict is for {num_tasks} tasks, this {type(self).__name__} has "
                    f"{self.num_tasks}"
                )
        generator, generator_state = self.method.generator, state_dict.get("generator")
        if generator is not None:
            _check_generator_state(generator, generator_state)
        trial = copy.deepcopy(self.method)  # the method checks its state on a copy first
        trial.load_state_dict(method_state)
        if num_tasks is not None:
            trial.check_num_tasks(num_tasks)
        _check_optimizer_state(self.optimizer, state_dict["optimizer"])

        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.method.load_state_dict(method_state)
        if generator is not None:
            generator.set_state(generator_state)
        self._pipeline.generator_shared = False  # processes may have loaded different states
        self._pipeline.num_tasks = num_tasks if num_tasks is not None else self.num_tasks
        self._skip_next_step = False

    # -- copying, pickling, attributes ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # torch.optim.Optimizer's keeps three entries
        state = self.__dict__.copy()
        # A learning-rate scheduler wraps the instance's step; like torch.optim.Optimizer, a
        # copy gets the plain one (the scheduler is not part of the copy).
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # ... and patches the class
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        # The method's attributes read through the wrapper (opt.conflict_stats, opt.generator).
        method = self.__dict__.get("method") if not name.startswith("__") else None
        if method is not None and not name.startswith("_"):
            try:
                return getattr(method, name)
            except AttributeError:
                pass
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r}, optimizer={self.optimizer!r})"


def wrapper_class(
    method_class: type[Method], *, aliases: Mapping[str, str] | None = None
) -> type[MultiTaskOptimizer]:
    """The public wrapper class of one method: its hyper-parameters as keyword arguments.

    ``wrapper_class(methods.MGDA)(optimizer, normalization="l2", engine=e)`` is
    ``MultiTaskOptimizer(optimizer, methods.MGDA(normalization="l2"), engine=e)``. A method
    argument that is also a wrapper option (``num_tasks``) goes to both. ``aliases`` maps extra
    method names to existing ones (``{"pc_backward": "backward"}``).
    """
    name = method_class.__name__
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    method_params = [p for p in _signature(method_class).parameters.values() if p.kind in kinds]
    wrapper = list(_signature(MultiTaskOptimizer.__init__).parameters.values())
    self_param, optimizer_param, options = wrapper[0], wrapper[1], wrapper[3:]
    option_names = {p.name for p in options}
    hyper = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in method_params]
    hyper = [p for p in hyper if p.name not in option_names]
    to_method = [p.name for p in method_params]
    signature = inspect.Signature([self_param, optimizer_param, *hyper, *options])

    def __init__(self: MultiTaskOptimizer, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        signature.bind(self, optimizer, **kwargs)  # a TypeError naming an unknown argument
        method = method_class(**{k: kwargs[k] for k in to_method if k in kwargs})
        options_given = {k: v for k, v in kwargs.items() if k in option_names}
        MultiTaskOptimizer.__init__(self, optimizer, method, **options_given)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    namespace: dict[str, Any] = {
        "__init__": __init__,
        "__doc__": _wrapper_doc(method_class),
        "__module__": "gradsurgery",
        "__qualname__": name,
        "method_class": method_class,
    }
    for alias, target in (aliases or {}).items():
        namespace[alias] = getattr(MultiTaskOptimizer, target)
    cls = type(name, (MultiTaskOptimizer,), namespace)
    cls.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:]
    )
    return cls


def _signature(function: Callable[..., Any]) -> inspect.Signature:
    """The signature with its annotations evaluated (the generated class lives in another
    module, where the names of postponed annotations would not resolve)."""
    try:
        return inspect.signature(function, eval_str=True)
    except NameError:  # an annotation that only exists for type checkers
        return inspect.signature(function)


_RELATIVE_REFERENCE = re.compile(r":(meth|attr):`(\w+)`")


def _qualify_references(doc: str, method_class: type[Method]) -> str:
    """Point the method docstring's short references (:meth:`end_epoch`) at the method class:
    in the wrapper's docstring they would name attributes of the wrapper."""
    path = f"{method_class.__module__}.{method_class.__qualname__}"

    def qualify(match: re.Match[str]) -> str:
        role, name = match.groups()
        if hasattr(MultiTaskOptimizer, name):
            return match.group(0)
        return f":{role}:`~{path}.{name}`"

    return _RELATIVE_REFERENCE.sub(qualify, doc)


def _wrapper_doc(method_class: type[Method]) -> str:
    name = method_class.__name__
    doc = _qualify_references(inspect.cleandoc(method_class.__doc__ or name), method_class)
    summary, _, body = doc.partition("\n\n")
    intro = (
        f"{summary}\n\n"
        f"A :class:`MultiTaskOptimizer` running :class:`{method_class.__module__}.{name}`: "
        f"``gs.{name}(optimizer, **hyper_parameters, **options)`` is "
        f"``gs.MultiTaskOptimizer(optimizer, gs.methods.{name}(**hyper_parameters), "
        "**options)``. It behaves as the optimizer it wraps; :meth:`backward` takes the place "
        "of ``loss.backward()``."
    )
    optimizer_doc = (
        "optimizer : torch.optim.Optimizer\n"
        "    The optimizer to wrap; its parameters are the ones the method writes ``.grad`` into."
    )
    header = "Parameters\n----------\n"
    if header in body:
        before, _, rest = body.partition(header)
        params, sep, after = rest.partition("\n\n")
        # A blank line inside one parameter's description is kept with it.
        while after and after.startswith(" "):
            more, sep, after = after.partition("\n\n")
            params = f"{params}\n\n{more}"
        body = f"{before}{header}{optimizer_doc}\n{params}\n{_OPTIONS_DOC}{sep}{after}"
    else:
        body = f"{body}\n\n{header}{optimizer_doc}\n{_OPTIONS_DOC}"
    return f"{intro}\n\n{body.strip()}\n"


class GradNorm:
    """GradNorm task weighting (Chen et al. 2018), stand-alone beside your optimizer.

    Learns one weight ``w_i`` per task so that the norms ``G_i = ||grad_W (w_i L_i)||`` of the
    weighted task gradients at the shared parameters ``W`` move toward
    ``mean(G) * r_i^alpha``, where ``r_i = Lt_i / mean(Lt)`` is task ``i``'s relative inverse
    training rate and ``Lt_i = L_i(t) / L_i(0)`` its loss ratio: tasks that learn slower get
    larger gradients. The GradNorm loss ``sum_i |G_i - target_i|`` moves only the task
    weights, with an Adam of its own; the network is trained on ``sum_i w_i L_i`` by the
    user's optimizer. The mathematics is :class:`gradsurgery.methods.gradnorm.GradNorm`; this class
    writes ``.grad`` of every parameter the losses reach, with no optimizer to wrap.

    Since ``G_i = w_i ||grad_W L_i||`` and the norm does not depend on ``w``, one backward per
    task to ``W`` (no double backward) and one weighted backward (no second forward) suffice.

    Parameters
    ----------
    num_tasks : int
        ``T``.
    shared_parameters : module or iterable of Tensor
        ``W``: the shared layer whose gradient norms are balanced (the paper uses the last
        shared layer).
    alpha : float
        Asymmetry (default 1.5); ``0`` balances the norms equally. Finite, ``>= 0``.
    lr : float
        Learning rate of the weights' Adam (default 0.01). Finite, ``> 0``.
    parametrization : {"softmax", "renormalize"}
        ``"softmax"`` (default): ``w = T * softmax(log_w)``, always positive and summing to
        ``T``. ``"renormalize"``: the paper's raw weights, clamped positive and rescaled to sum
        to ``T`` after each step.
    nonfinite : {"raise", "skip"}
        What a NaN or Inf in a loss or gradient does: raise :class:`NonFiniteError` (default),
        or skip the call (weights and ``.grad`` untouched), reported as ``info.skipped``.
    engine : BatchPartitionEngine, optional
        How the per-task gradients are computed. By default one autograd call per task down to
        ``W`` plus one weighted backward; with a :class:`BatchPartitionEngine`, a single
        backward pass gives every task's gradient and their weighted sum.
    distributed : bool, optional
        Average the per-task gradients and losses over the processes of ``process_group``
        (one all-reduce per step), so that the weights, ``L(0)`` and the written gradient are
        those of the global batch and identical on every process. ``None`` (default): whenever
        torch.distributed is initialized with more than one process.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; the default group when ``None``.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> _ = torch.manual_seed(0)
    >>> body, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    >>> optimizer = torch.optim.SGD([*body.parameters(), *heads.parameters()], lr=0.1)
    >>> gn = gs.GradNorm(num_tasks=2, shared_parameters=body, alpha=1.5, lr=0.01)
    >>> out = heads(torch.relu(body(torch.randn(16, 4))))
    >>> losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()]
    >>> optimizer.zero_grad()
    >>> info = gn.backward(losses)
    >>> optimizer.step()
    >>> round(float(gn.weights.sum()), 4)
    2.0
    """

    def __init__(
        self,
        num_tasks: int,
        shared_parameters: Iterable[Tensor] | nn.Module,
        *,
        alpha: float = 1.5,
        lr: float = 0.01,
        parametrization: str = "softmax",
        nonfinite: str = "raise",
        engine: Engine | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        num_tasks = check_num_tasks(num_tasks)
        if shared_parameters is None:
            raise TypeError(
                "GradNorm needs shared_parameters: the module or parameters W whose gradient "
                "norms it balances (the paper uses the last shared layer)"
            )
        self.shared_parameters = as_parameter_list(shared_parameters, "shared_parameters")
        check_real_parameters(self.shared_parameters, "shared_parameters")
        self.method = GradNormMethod(alpha, lr, parametrization, num_tasks=num_tasks)
        check_engine(engine)
        _check_dense_layers(engine, shared_parameters)
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        self._pipeline = UpdatePipeline(
            self.method,
            engine=engine,
            shared=self.shared_parameters,
            nonfinite=check_nonfinite_policy(nonfinite),
            num_tasks=num_tasks,
            distributed=distributed,
            process_group=process_group,
        )
        self._pipeline.last_weights = self.method.weights  # what a skipped step reports

    num_tasks = property(lambda self: self._pipeline.num_tasks, doc="``T``.")
    alpha = property(lambda self: self.method.alpha, doc="The asymmetry ``alpha``.")
    lr = property(lambda self: self.method.lr, doc="Learning rate of the weights' Adam.")
    parametrization = property(lambda self: self.method.parametrization)
    engine = property(lambda self: self._pipeline.engine)
    nonfinite = property(lambda self: self._pipeline.nonfinite)
    distributed = property(lambda self: self._pipeline.distributed)
    process_group = property(lambda self: self._pipeline.process_group)

    @property
    def weights(self) -> Tensor:
        """Current task weights, shape ``[T]``, positive and summing to ``T`` (a copy)."""
        return torch.tensor(self.method.weights, dtype=torch.float64)

    @property
    def initial_losses(self) -> Tensor | None:
        """``L_i(0)``: the losses of the first update since creation or :meth:`reset`."""
        return self.method.initial_losses

    def reset(self) -> None:
        """Forget ``L_i(0)``: the next update takes its losses as the new initial losses."""
        self.method.reset()

    def update_weights(
        self, losses: Sequence[Tensor], *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> GradNormInfo:
        """Update the task weights from ``losses``; the model's ``.grad`` is not touched.

        The autograd graph of ``losses`` is kept, so the caller can still backward through it.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Mixed precision: the gradient norms are taken on scaled losses and unscaled.

        Returns
        -------
        GradNormInfo
        """
        return self._run(losses, grad_scaler, write=False)

    def backward(
        self, losses: Sequence[Tensor], *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> GradNormInfo:
        """Update the task weights, then add ``sum_i w_i grad L_i`` to the parameters' ``.grad``.

        The weights are those after the update. Equals the reference procedure (GradNorm step,
        second forward pass, weighted backward) without the second forward pass. Like
        ``loss.backward()`` it accumulates into ``.grad`` of every parameter the losses reach,
        and frees the graph.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Mixed precision: the weighted loss is scaled; a gradient overflow is left in
            ``.grad`` (weights not updated) for ``grad_scaler.step`` to skip.

        Returns
        -------
        GradNormInfo
        """
        return self._run(losses, grad_scaler, write=True)

    def _run(
        self, losses: Sequence[Tensor], grad_scaler: torch.amp.GradScaler | None, write: bool
    ) -> GradNormInfo:
        info, _ = self._pipeline.run(losses, None, grad_scaler=grad_scaler, write=write)
        assert isinstance(info, GradNormInfo)
        return info

    def state_dict(self) -> dict[str, Any]:
        """Weights, ``L(0)`` and the state of the weights' Adam."""
        return self.method.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; all of it is checked before anything changes."""
        self.method.load_state_dict(state_dict)
        self._pipeline.last_weights = self.method.weights

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.3f}" for w in self.weights.tolist())
        return f"GradNorm(num_tasks={self.num_tasks}, alpha={self.alpha}, weights=[{weights}])"


def _optimized(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _method_parameters(method: Method) -> list[Tensor]:
    """The method's learned parameters (UW's log-variances), if it has any."""
    parameters = getattr(method, "parameters", None)
    return list(parameters()) if callable(parameters) else []


def _add_method_parameters(
    optimizer: torch.optim.Optimizer, method: Method, optimized: list[Tensor]
) -> None:
    """Give the method's learned parameters to the optimizer that trains the model (those it
    already optimizes stay where they are): the papers train them with the model's optimizer,
    and left out they would never move.

    They join the first parameter group whose settings are the optimizer's defaults: the same
    update as a group of their own, in the same optimizer call as the model's parameters (a
    second group costs a second pass of the optimizer's per-group work at every step).
    Where no group has the defaults, or the optimizer adds groups its own way (ZeRO's
    partitioning, named parameters), they get a new group with the defaults.
    """
    known = {id(p) for p in optimized}
    new = [p for p in _method_parameters(method) if id(p) not in known]
    if not new:
        return
    check_real_parameters(new, f"{type(method).__name__}.parameters()")
    joinable = type(optimizer).add_param_group is torch.optim.Optimizer.add_param_group
    for group in optimizer.param_groups if joinable else ():
        if "param_names" not in group and _has_defaults(group, optimizer.defaults):
            group["params"].extend(new)
            return
    optimizer.add_param_group({"params": new})


def _has_defaults(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Whether a parameter group's settings are the optimizer's defaults (a tensor setting,
    such as a tensor learning rate, only when it is the defaults' very object)."""
    for name, default in defaults.items():
        value = group.get(name, _MISSING)
        if value is default:
            continue
        if isinstance(value, Tensor) or isinstance(default, Tensor) or value != default:
            return False
    return True


_MISSING = object()


def _check_dense_layers(engine: object, shared: object) -> None:
    """Refuse layers that produce sparse gradients: per-task gradients are dense rows."""
    modules = [m for m in (getattr(engine, "model", None), shared) if isinstance(m, nn.Module)]
    for root in modules:
        for name, module in root.named_modules():
            if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
                raise TypeError(
                    f"{name or type(module).__name__} is an {type(module).__name__} with "
                    "sparse=True, whose gradients are sparse: per-task gradients are dense "
                    "rows; build it with sparse=False"
                )


def _check_generator_state(generator: torch.Generator, state: Any) -> None:
    scratch = torch.Generator(device=generator.device)
    try:
        scratch.set_state(state)
    except (TypeError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"state_dict has no valid generator state ({type(state).__name__}): {error}"
        ) from error


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """What ``torch.optim.Optimizer.load_state_dict`` checks, before anything is loaded."""
    if not isinstance(state, Mapping) or not {"state", "param_groups"} <= state.keys():
        raise ValueError("state_dict['optimizer'] is not an optimizer state_dict")
    groups, saved = optimizer.param_groups, state["param_groups"]
    if len(groups) != len(saved):
        raise ValueError(
            f"state_dict['optimizer'] has {len(saved)} parameter groups, the optimizer has "
            f"{len(groups)}"
        )
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved]
    if sizes != saved_sizes:
        raise ValueError(
            f"state_dict['optimizer'] has groups of {saved_sizes} parameters, the optimizer "
            f"has {sizes}"
        )
