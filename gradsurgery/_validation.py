"""Checks of user input, in one place so every entry point says the same thing.

Every check here runs *before* anything is mutated: a call that fails leaves ``.grad``,
the optimizer state and the task weights exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum")
_NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteError(ValueError):
    """A task loss or a task gradient holds NaN or Inf.

    Raised by :class:`~gradsurgery.PCGrad` and :class:`~gradsurgery.GradNorm` with the default
    ``nonfinite="raise"``; nothing is changed when it is raised.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.ones(2, requires_grad=True)
    >>> opt = gs.PCGrad(torch.optim.SGD([w], lr=0.1))
    >>> try:
    ...     opt.pc_backward([w.sum(), w.sum() * float("nan")])
    ... except gs.NonFiniteError as error:
    ...     print(str(error).split(";")[0])
    the loss of task(s) 1 holds NaN or Inf
    >>> w.grad is None
    True
    """


def check_losses(losses: Sequence[Tensor], num_tasks: int | None = None) -> list[Tensor]:
    """Validate a list of task losses and return it as a list.

    Raises a :class:`TypeError` or :class:`ValueError` that names the offending task.
    """
    if isinstance(losses, Tensor):
        raise TypeError(
            "losses must be a list of scalar tensors, one per task, not a single tensor; "
            "use list(losses) if you stacked them"
        )
    losses = list(losses)
    if not losses:
        raise ValueError("losses is empty: expected one scalar loss per task")
    if num_tasks is not None and len(losses) != num_tasks:
        raise ValueError(f"expected {num_tasks} losses (one per task), got {len(losses)}")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss of task {i} is a {type(loss).__name__}, not a torch.Tensor")
        if loss.dim() != 0:
            raise ValueError(
                f"loss of task {i} is not a scalar (shape {tuple(loss.shape)}); "
                "reduce it first, e.g. with .mean()"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"loss of task {i} does not require grad: it was computed without a graph "
                "(under torch.no_grad(), or from detached tensors)"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss of task {i} has dtype {loss.dtype}, expected a float dtype")
    devices = {loss.device for loss in losses}
    if len(devices) > 1:
        names = ", ".join(f"task {i}: {loss.device}" for i, loss in enumerate(losses))
        raise ValueError(f"losses are on different devices ({names}); move them to one device")
    return losses


def nonfinite_tasks(values: Tensor) -> list[int]:
    """Indices of the rows (tasks) of ``values`` that hold a NaN or an Inf."""
    # NaN and Inf survive a sum, so one reduction clears the common case; only a non-finite
    # sum (a real NaN/Inf, or a float overflow of the sum) pays for the exact elementwise test.
    if math.isfinite(values.sum()):
        return []
    rows = values.reshape(values.shape[0], -1)
    finite = torch.isfinite(rows).all(dim=1)
    return torch.nonzero(~finite).flatten().tolist()


def loss_values(losses: Sequence[Tensor]) -> list[float]:
    """The losses' values as Python floats, with one device sync at most."""
    if losses[0].device.type == "cpu":  # a few item() calls cost less than one stack
        return [loss.item() for loss in losses]
    return torch.stack([loss.detach() for loss in losses]).tolist()


def nonfinite_values(values: Sequence[float]) -> list[int]:
    """Indices of the values that are NaN or infinite."""
    return [i for i, value in enumerate(values) if not math.isfinite(value)]


def check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def check_nonfinite_policy(nonfinite: str) -> str:
    if nonfinite not in _NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
    return nonfinite


def check_num_tasks(num_tasks: int) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    return num_tasks


def check_real(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real hyper-parameter in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or "
            f"None, got {type(generator).__name__} {generator!r}"
        )
    return generator


def check_engine(engine: object) -> None:
    """An engine is an object with ``jacobian`` (and ``reached_jacobian``), or ``None``."""
    if engine is None:
        return
    if not (callable(getattr(engine, "jacobian", None)) and hasattr(engine, "single_backward")):
        raise TypeError(
            "engine must be an engine object, e.g. gs.BatchPartitionEngine(model), or None for "
            f"the default per-task autograd engine; got {type(engine).__name__} {engine!r}"
        )


def check_real_parameters(params: Sequence[Tensor], what: str) -> None:
    """Refuse complex (and other non-floating) parameters, naming the first one."""
    for k, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(
                f"{what} holds a tensor of dtype {p.dtype} (tensor {k}, shape "
                f"{tuple(p.shape)}): gradsurgery combines real floating-point gradients only; "
                "optimize complex parameters as real views (torch.view_as_real) or with a "
                "separate optimizer"
            )


def as_parameter_list(parameters: Iterable[Tensor] | torch.nn.Module, what: str) -> list[Tensor]:
    """Accept a module or an iterable of tensors; return the tensors that require grad."""
    if parameters is None:
        raise TypeError(
            f"{what} is None: pass the module or the parameters (an iterable of tensors) it names"
        )
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(
            f"{what} must be a module or an iterable of tensors, got {type(parameters).__name__}"
        ) from None
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must hold tensors, got a {type(p).__name__}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{what} is empty: no tensor in it requires grad")
    return unique(params)


def unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    """``tensors`` without repeats (by identity), in order."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
