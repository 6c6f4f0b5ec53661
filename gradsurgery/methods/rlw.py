"""Random loss weighting (Lin et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._rlw import _rlw_weights, check_distribution

__all__ = ["RLW"]


class RLW(Method):
    """Random loss weighting: fresh random weights on the simplex at every step.

    ``"normal"`` (default): ``softmax(z)``, ``z ~ N(0, I)``, the paper's Algorithm 2 and the
    authors' code; ``"dirichlet"``: uniform on the simplex. See
    :func:`~gradsurgery.functional.rlw_weights`.

    Parameters
    ----------
    distribution : {"normal", "dirichlet"}
        The weights' distribution.
    generator : torch.Generator, optional
        A CPU generator; a private one seeded with ``torch.initial_seed()`` when ``None``. Its
        state is saved by :meth:`state_dict`; under distributed training every process uses the
        same draws.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.rlw import RLW
    >>> method = RLW(generator=torch.Generator().manual_seed(0))
    >>> round(sum(method.decide(TaskStats(losses=(1.0, 2.0, 3.0))).weights), 12)
    1.0
    """

    needs = Needs.LOSSES

    def __init__(
        self, distribution: str = "normal", *, generator: torch.Generator | None = None
    ) -> None:
        check_distribution(distribution)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
        self.distribution = distribution
        self.generator = generator

    def decide(self, stats: TaskStats) -> Decision:
        # Drawn in place: the update pipeline puts the generator back if the step is refused.
        return Decision(weights=_rlw_weights(stats.num_tasks, self.distribution, self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != {"generator"}:
            raise ValueError(
                f"not an RLW state: expected the key 'generator', got {sorted(state_dict)}"
            )
        probe = torch.Generator()
        try:
            probe.set_state(state_dict["generator"])  # validates before changing ours
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"not an RLW generator state: {error}") from error
        self.generator.set_state(state_dict["generator"])

    def __repr__(self) -> str:
        return f"RLW(distribution={self.distribution!r})"
