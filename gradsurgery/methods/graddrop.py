"""GradDrop (Chen et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._graddrop import _graddrop, check_leak, draw_uniform

__all__ = ["GradDrop"]


class GradDrop(Method):
    r"""Gradient Sign Dropout: each coordinate keeps the task gradients of one sign.

    At every coordinate of the shared parameters, the positive task gradients survive with
    probability :math:`\mathcal P`, the sign purity, and the negative ones otherwise (see
    :func:`~gradsurgery.functional.graddrop`). It works on coordinates, so it reads the
    per-task gradients themselves, not only their Gramian. As in torchjd, it acts on the
    parameters' gradients; the paper and LibMTL apply it to the gradients at a shared
    activation layer. Parameters outside the shared set get the plain gradient of every task
    that reaches them.

    Parameters
    ----------
    leak : float or sequence of float
        How much of a dropped gradient leaks through, for every task or per task, in
        ``[0, 1]`` (default 0).
    generator : torch.Generator, optional
        Source of the uniform draws (one per shared coordinate and step); a private CPU one
        seeded with ``torch.initial_seed()`` when ``None``. Draws are made on its device. Its
        state is saved by :meth:`state_dict`.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery._jacobian import TaskJacobian
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.graddrop import GradDrop
    >>> grads = torch.tensor([[1.0, 2.0, 0.5], [-3.0, 1.0, 0.5]])   # two parameters: 2 + 1
    >>> stats = TaskStats(losses=(1.0, 1.0), jacobian=TaskJacobian(grads, None, [2, 1]))
    >>> decision = GradDrop(generator=torch.Generator().manual_seed(0)).decide(stats)
    >>> decision.direction      # no conflict at coordinates 2 and 3: their sums
    [tensor([-3.,  3.]), tensor([1.])]
    """

    needs = Needs.JACOBIAN
    unshared = "sum"

    def __init__(
        self, leak: float | Sequence[float] = 0.0, *, generator: torch.Generator | None = None
    ) -> None:
        self.leak = check_leak(leak, None)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.initial_seed())
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
        self.generator = generator

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        if len(self.leak) not in (1, num_tasks):
            raise ValueError(f"GradDrop's leak has {len(self.leak)} entries, got {num_tasks} tasks")

    def decide(self, stats: TaskStats) -> Decision:
        self.check_num_tasks(stats.num_tasks)
        jacobian = stats.jacobian
        if jacobian is None:
            raise RuntimeError("GradDrop needs the per-task gradients (Needs.JACOBIAN)")
        matrix = jacobian.matrix
        numels = jacobian.numels
        shared = None if stats.shared is None else np.asarray(stats.shared, dtype=bool)
        all_shared = shared is None or bool(shared.all())
        columns = None if all_shared else torch.from_numpy(np.repeat(shared, numels))
        num_shared = matrix.shape[1] if columns is None else int(columns.sum())
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        # Draw, then put the generator back: the new state is committed only with the step.
        before = self.generator.get_state()
        uniform = draw_uniform(num_shared, dtype, self.generator)
        after = self.generator.get_state()
        self.generator.set_state(before)
        if columns is None:
            update = _graddrop(matrix, self.leak, uniform)
        else:  # the unshared columns get the plain sum (``unshared = "sum"``)
            columns = columns.to(matrix.device)
            update = matrix.sum(dim=0)
            update[columns] = _graddrop(matrix[:, columns], self.leak, uniform)
        return Decision(
            weights=[1.0] * stats.num_tasks, direction=list(update.split(numels)), state=after
        )

    def commit(self, state: Any) -> None:
        self.generator.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != {"generator"}:
            raise ValueError(
                f"not a GradDrop state: expected the key 'generator', got {sorted(state_dict)}"
            )
        probe = torch.Generator(self.generator.device)
        try:
            probe.set_state(state_dict["generator"])  # validates before changing ours
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"not a GradDrop generator state: {error}") from error
        self.generator.set_state(state_dict["generator"])

    def __repr__(self) -> str:
        leak = self.leak[0] if len(self.leak) == 1 else self.leak
        return f"GradDrop(leak={leak})"
