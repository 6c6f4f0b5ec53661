"""GradVac (Wang et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional import _projection_orders
from ..functional._gradvac import _gradvac, check_targets

__all__ = ["GradVac"]


class GradVac(Method):
    r"""Gradient Vaccine: raise each pair's cosine to an adaptive target.

    Every task's gradient gets, for each other task in a random order, the multiple of that
    task's gradient that lifts their cosine to the pair's target, an exponential moving average
    of the cosines seen (see :func:`~gradsurgery.functional.gradvac_weights`). The update is
    the sum of the corrected gradients, as in the paper, LibMTL and torchjd, over all shared
    parameters at once (LibMTL's ``whole_model``). Parameters outside the shared set get the
    plain gradient of every task that reaches them.

    Parameters
    ----------
    beta : float
        EMA rate of the targets, in ``[0, 1]`` (default 0.5).
    eps : float
        Added to the denominators as LibMTL and torchjd do (default ``1e-8``); ``0`` for the
        paper's scale-free formula.
    generator : torch.Generator, optional
        A CPU generator for the visiting orders (drawn as PCGrad's); a private one seeded with
        ``torch.initial_seed()`` when ``None``. Its state is saved by :meth:`state_dict`.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.gradvac import GradVac
    >>> method = GradVac(generator=torch.Generator().manual_seed(0))
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -1.0], [-1.0, 4.0]])
    >>> decision = method.decide(stats)
    >>> [round(w, 4) for w in decision.weights]
    [2.0, 1.25]
    >>> method.commit(decision.state)
    >>> method.targets
    tensor([[ 0.0000, -0.2500],
            [-0.2500,  0.0000]], dtype=torch.float64)
    """

    needs = Needs.GRAMIAN
    unshared = "sum"

    def __init__(
        self, beta: float = 0.5, *, eps: float = 1e-8, generator: torch.Generator | None = None
    ) -> None:
        self.beta = check_number(beta, "beta", low=0.0, high=1.0)
        self.eps = check_number(eps, "eps", low=0.0)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
        self.generator = generator
        self._targets: list[list[float]] | None = None

    @property
    def targets(self) -> torch.Tensor | None:
        """``[T, T]`` float64 cosine targets, ``None`` before the first step."""
        if self._targets is None:
            return None
        return torch.tensor(self._targets, dtype=torch.float64)

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        if self._targets is not None and len(self._targets) != num_tasks:
            raise ValueError(
                f"GradVac's targets are for {len(self._targets)} tasks, got {num_tasks}; "
                "call reset() to start over with a different number of tasks"
            )

    def decide(self, stats: TaskStats) -> Decision:
        num_tasks = stats.num_tasks
        self.check_num_tasks(num_tasks)
        targets = self._targets or [[0.0] * num_tasks for _ in range(num_tasks)]
        # Draw, then put the generator back: the new state is committed only with the step.
        before = self.generator.get_state()
        orders = _projection_orders(num_tasks, self.generator).tolist()
        after = self.generator.get_state()
        self.generator.set_state(before)
        weights, new_targets = _gradvac(stats.gramian_rows, targets, orders, self.beta, self.eps)
        return Decision(weights=weights, state=(new_targets, after))

    def commit(self, state: Any) -> None:
        targets, generator_state = state
        self._targets = targets
        self.generator.set_state(generator_state)

    def reset(self) -> None:
        self._targets = None

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != {"targets", "generator"}:
            raise ValueError(
                f"not a GradVac state: expected the keys 'generator' and 'targets', got "
                f"{sorted(state_dict)}"
            )
        targets = state_dict["targets"]
        if targets is not None:
            size = len(targets) if hasattr(targets, "__len__") else -1
            targets = check_targets(targets, size)
        probe = torch.Generator()
        try:
            probe.set_state(state_dict["generator"])  # validates before changing ours
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"not a GradVac generator state: {error}") from error
        self.generator.set_state(state_dict["generator"])
        self._targets = targets

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps})"
