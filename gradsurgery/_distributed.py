"""torch.distributed support: the surgery acts on the global per-task gradients.

Under data parallelism every process holds a slice of every task's batch. PCGrad and GradNorm
are not linear in the gradients, so averaging the *combined* gradients across processes (what
DistributedDataParallel's backward hooks do) is not the method on the global batch. Instead,
each process computes its local per-task gradients, one all-reduce averages them (with the loss
values and the reach pattern packed alongside, so there is a single collective per step), and
every process then runs the same deterministic surgery on identical inputs.

The wrappers never call ``backward()``, so DDP's own all-reduce hooks never fire and nothing is
reduced twice; running the forward pass under ``ddp_model.no_sync()`` is allowed but not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._jacobian import TaskJacobian


@dataclass(frozen=True)
class Synchronizer:
    """Averages per-task data over the processes of ``group`` (``None``: the default group)."""

    group: dist.ProcessGroup | None

    def all_reduce(
        self, jacobian: TaskJacobian, loss_values: Sequence[float]
    ) -> tuple[TaskJacobian, list[float]]:
        """Average the per-task gradients and loss values over the processes.

        One all-reduce carries the ``[T, P]`` gradients (factored ones expanded first), the
        ``[T, n_params]`` reach pattern and the ``T`` loss values. A NaN or Inf on any process
        reaches every process, so all of them refuse (or skip) the same step and none waits on
        a collective the others skipped.
        """
        matrix = jacobian.matrix
        dtype = matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32
        width = matrix.shape[1]
        reached = torch.from_numpy(jacobian.reached).to(device=matrix.device, dtype=dtype)
        values = torch.tensor(loss_values, device=matrix.device, dtype=dtype)[:, None]
        packed = torch.cat([matrix.to(dtype), reached, values], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        packed /= dist.get_world_size(self.group)
        reduced = TaskJacobian(
            packed[:, :width].to(matrix.dtype),
            packed[:, width:-1].cpu().numpy() > 0,
            jacobian.numels,
        )
        return reduced, packed[:, -1].tolist()

    def broadcast_generator(self, generator: torch.Generator) -> None:
        """Give every process the generator state of the group's first process.

        PCGrad's projection orders are random: processes seeded differently would project in
        different orders and their replicas would drift apart. After this, they draw the same
        orders for as long as they draw in lockstep.
        """
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else [0]
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=ranks[0], group=self.group)
        generator.set_state(state[0])


def synchronizer(
    distributed: bool | None, process_group: dist.ProcessGroup | None
) -> Synchronizer | None:
    """What to synchronize with, or ``None`` when this process works alone.

    ``distributed=None`` synchronizes when torch.distributed is initialized with more than one
    process; ``True`` requires it; ``False`` never synchronizes.
    """
    if distributed is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise RuntimeError(
                "distributed=True but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first (torchrun does it for you)"
            )
        return None
    if dist.get_world_size(process_group) == 1:
        return None
    return Synchronizer(process_group)
