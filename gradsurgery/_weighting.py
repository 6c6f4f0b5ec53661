"""The method contract: what a multi-task method needs, and what it decides.

A method is its mathematics. It declares what it reads (:class:`Needs`), receives those
quantities as a :class:`TaskStats`, and returns a :class:`Decision`: the combination
weights of the task gradients, its diagnostics, and the state it wants to keep. It never
touches engines, processes, gradient scalers or ``.grad``: the update pipeline does all of
that, and commits the new state only once ``.grad`` is written, so a refused step changes
nothing.

Writing a method takes one subclass of :class:`Method` with one :meth:`Method.decide`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ._info import StepInfo

if TYPE_CHECKING:  # the Jacobian type only; a method never imports an engine
    from ._jacobian import TaskJacobian

__all__ = ["Decision", "Method", "Needs", "TaskStats"]


class Needs(enum.IntEnum):
    """What a method reads; each level includes the ones before it.

    ``LOSSES``: the loss values only. The pipeline computes no per-task gradient at all: the
    update is one backward pass of the weighted sum of the losses (loss weightings).
    ``NORMS``: also the per-task gradient norms of the shared parameters.
    ``GRAMIAN``: also the ``[T, T]`` Gramian of the shared parameters' task gradients (every
    method whose result is a combination of the task gradients).
    ``JACOBIAN``: also the per-task gradients themselves, for the rare method that needs
    coordinates (GradDrop).
    """

    LOSSES = 0
    NORMS = 1
    GRAMIAN = 2
    JACOBIAN = 3


@dataclass(frozen=True)
class TaskStats:
    """The quantities of one step that a method may read (all unscaled, synchronized).

    Attributes
    ----------
    losses : tuple of float
        The ``T`` loss values (averaged over processes when synchronized).
    gramian_rows : list of list of float, optional
        The ``[T, T]`` Gramian of the shared parameters, as Python floats (float64), when
        ``needs >= GRAMIAN``.
    squared_norms : tuple of float, optional
        The squared norms of the task gradients on the shared parameters, when
        ``needs >= NORMS``.
    jacobian : optional
        The per-task gradients (a ``TaskJacobian``), when ``needs == JACOBIAN``.
    shared : optional
        Which parameters of ``jacobian`` are shared (a NumPy bool array, one per parameter);
        ``None``: all.
    """

    losses: tuple[float, ...]
    gramian_rows: list[list[float]] | None = None
    squared_norms: tuple[float, ...] | None = None
    jacobian: TaskJacobian | None = None
    shared: Any = None

    @property
    def num_tasks(self) -> int:
        return len(self.losses)

    @cached_property
    def gramian(self) -> Tensor:
        """The Gramian as a ``[T, T]`` float64 CPU tensor (built when first read)."""
        if self.gramian_rows is None:
            raise RuntimeError("this method did not declare needs >= Needs.GRAMIAN")
        return torch.tensor(self.gramian_rows, dtype=torch.float64)

    @cached_property
    def grad_norms(self) -> tuple[float, ...]:
        """Norms of the task gradients on the shared parameters."""
        if self.squared_norms is not None:
            return tuple(math.sqrt(max(s, 0.0)) for s in self.squared_norms)
        if self.gramian_rows is not None:
            return tuple(math.sqrt(max(row[i], 0.0)) for i, row in enumerate(self.gramian_rows))
        raise RuntimeError("this method did not declare needs >= Needs.NORMS")


@dataclass(frozen=True)
class Decision:
    """What a method decided for one step.

    Attributes
    ----------
    weights : sequence of float or Tensor
        ``[T]``: the shared parameters' ``.grad`` gets ``sum_i weights[i] * grad L_i`` (for
        ``needs == LOSSES``: the gradient of ``sum_i weights[i] * L_i``, for every parameter).
    direction : list of Tensor, optional
        For coordinate methods only: the shared parameters' update itself, one flat tensor per
        parameter of the Jacobian (``weights`` then only describe the unshared parameters).
    parameter_grads : dict, optional
        Gradients of the method's own learned parameters (e.g. uncertainty weighting's
        log-variances), written into their ``.grad`` together with the model's: a tensor, or
        for a 1-d parameter the Python floats of its gradient (packed by the pipeline).
    state : Any
        The method's state after this step; handed to :meth:`Method.commit` once ``.grad`` is
        written. ``None`` keeps nothing.
    extras : dict
        Method-specific diagnostics, exposed on the step's info object.
    """

    weights: Sequence[float] | Tensor
    direction: list[Tensor] | None = None
    parameter_grads: Mapping[Tensor, Tensor | Sequence[float]] | None = None
    state: Any = None
    extras: Mapping[str, Any] = field(default_factory=dict)


class Method:
    """Base class of every multi-task method.

    Subclasses set :attr:`needs` and implement :meth:`decide`. A stateful method keeps its
    state in plain attributes, returns the next state in :attr:`Decision.state`, and
    overrides :meth:`commit`, :meth:`state_dict`, :meth:`load_state_dict` and :meth:`reset`.
    A random method keeps a ``torch.Generator`` in :attr:`generator`: the pipeline shares it
    across processes and saves it with the method's state.

    Attributes
    ----------
    needs : Needs
        What :meth:`decide` reads.
    unshared : {"weights", "mean", "sum"}
        What the parameters outside the shared set get: the same weighted combination
        (``"weights"``, the weighted-loss convention of most methods), or the plain mean or sum
        of the gradients of the tasks that reach each of them (PCGrad's convention).
    generator : torch.Generator or None
        The source of a random method's numbers (``None``: the method draws none).
    info_class : type
        The :class:`~gradsurgery.StepInfo` subclass a step returns; its ``extras`` are the
        decision's.
    """

    needs: ClassVar[Needs] = Needs.GRAMIAN
    unshared: ClassVar[str] = "weights"
    generator: torch.Generator | None = None
    info_class: ClassVar[type[StepInfo]] = StepInfo

    def decide(self, stats: TaskStats) -> Decision:
        """The weights of this step, from the quantities declared in :attr:`needs`."""
        raise NotImplementedError

    def commit(self, state: Any) -> None:
        """Keep the state of a step whose ``.grad`` was written."""

    def reset(self) -> None:
        """Forget the state learned so far (hyper-parameters stay)."""

    def state_dict(self) -> dict[str, Any]:
        """The method's state; restored bit-for-bit by :meth:`load_state_dict`."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; validate all of it before changing anything."""
        if state_dict:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state_dict)}")

    def check_num_tasks(self, num_tasks: int) -> None:
        """Refuse a task count the method cannot take (raise ``ValueError``)."""
        if num_tasks < 1:
            raise ValueError("at least one task loss is needed")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
