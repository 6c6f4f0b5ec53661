"""What the methods with learned parameters (UW, IMTL-L) share: one ``[T]`` parameter trained
by the user's optimizer, whose gradient the method hands to the update pipeline."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .._weighting import Method, Needs


class LearnedLossWeighting(Method):
    """A loss weighting whose task weights come from a learned ``[T]`` parameter.

    The parameter is a ``torch.nn.Parameter`` the user's optimizer steps: pass
    :meth:`parameters` to the optimizer along with the model's. At every step the method returns
    the parameter's gradient in :attr:`~gradsurgery._weighting.Decision.parameter_grads`, and the
    update pipeline writes it into ``.grad`` with the model's gradients.
    """

    needs = Needs.LOSSES
    _parameter_name: str  # the attribute that holds the parameter, for messages and state

    def __init__(
        self,
        num_tasks: int,
        initial_value: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if not (isinstance(initial_value, int | float) and math.isfinite(initial_value)):
            raise ValueError(f"the initial value must be a finite number, got {initial_value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.num_tasks = num_tasks
        self.initial_value = float(initial_value)
        parameter = torch.nn.Parameter(
            torch.full((num_tasks,), self.initial_value, device=device, dtype=dtype)
        )
        setattr(self, self._parameter_name, parameter)

    @property
    def _parameter(self) -> torch.nn.Parameter:
        return getattr(self, self._parameter_name)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The learned parameter: add it to the optimizer, e.g.
        ``torch.optim.Adam([*model.parameters(), *method.parameters()])``."""
        yield self._parameter

    def check_num_tasks(self, num_tasks: int) -> None:
        if num_tasks != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_tasks} tasks, got {num_tasks} "
                "losses"
            )

    def _values(self) -> list[float]:
        return self._parameter.tolist()  # no graph is built: tolist() reads the values

    def _decision_parameters(self, gradient: list[float]) -> dict[Tensor, list[float]]:
        # Python floats: the pipeline checks and packs them into a fresh tensor itself.
        return {self._parameter: gradient}

    def reset(self) -> None:
        with torch.no_grad():
            self._parameter.fill_(self.initial_value)

    def state_dict(self) -> dict[str, Any]:
        """The learned parameter's values (the optimizer keeps its own moments)."""
        return {self._parameter_name: self._parameter.detach().clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy saved values into the parameter in place (the optimizer keeps referring to it)."""
        name = self._parameter_name
        if set(state_dict) != {name}:
            raise ValueError(
                f"not a {type(self).__name__} state: expected the key {name!r}, got "
                f"{sorted(state_dict)}"
            )
        values = state_dict[name]
        if not isinstance(values, Tensor) or values.shape != (self.num_tasks,):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"{name} must be a tensor of shape ({self.num_tasks},), got {shape}")
        if not torch.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or Inf")
        with torch.no_grad():
            self._parameter.copy_(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks})"
