"""Networks and data of the benchmarks.

Every method times one step on the SAME batch layout: the per-task batches are concatenated
(task-major: rows ``t*B .. (t+1)*B - 1`` belong to task ``t``), the model runs one forward pass
over all of them, and each task's loss is the MSE on its own slice. That is how the
LunarLander study computes its three TD losses (``td_losses`` in ``examples/lunarlander_mtl``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STATE_DIM = 8
NUM_ACTIONS = 4


class StudyNetwork(nn.Module):
    """The study's Q-network: 8-256-128-4 ("blind"), or with an 8-dim task embedding ("aware").

    Same layers and names as ``examples/lunarlander_mtl/networks.py`` (GradNorm balances the
    gradient norms at ``fc2``): 35,716 parameters blind, 37,788 aware.
    """

    def __init__(self, task_aware: bool, num_tasks: int = 3, embedding_dim: int = 8) -> None:
        super().__init__()
        self.task_aware = task_aware
        in_dim = STATE_DIM
        if task_aware:
            self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
            in_dim += embedding_dim
        self.fc1 = nn.Linear(in_dim, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, NUM_ACTIONS)

    def forward(self, obs: Tensor, task_ids: Tensor) -> Tensor:
        if self.task_aware:
            obs = torch.cat([obs, self.task_embedding(task_ids)], dim=-1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(obs)))))


class ScalingMLP(nn.Module):
    """``in -> width x depth (ReLU) -> 4``; ``fc2`` is a hidden layer, as in the study net."""

    def __init__(self, in_dim: int, width: int, depth: int) -> None:
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(width, NUM_ACTIONS)

    @property
    def fc2(self) -> nn.Module:
        return self.hidden[1]

    def forward(self, obs: Tensor, task_ids: Tensor) -> Tensor:
        del task_ids  # task-blind, like the study's blind network
        for layer in self.hidden:
            obs = F.relu(layer(obs))
        return self.head(obs)


# Scaling models: name -> (input dim, width, hidden layers). "35K" is the study's blind net.
SCALING_MODELS: dict[str, tuple[int, int, int] | None] = {
    "35K": None,  # StudyNetwork(task_aware=False): 35,716 parameters
    "1M": (32, 704, 3),  # 1,018,692 parameters
    "10M": (32, 2232, 3),  # 10,050,700 parameters
}


def make_model(name: str) -> nn.Module:
    """A model by name: "blind", "aware" (the study) or a key of ``SCALING_MODELS``."""
    if name in ("blind", "aware"):
        return StudyNetwork(task_aware=name == "aware")
    spec = SCALING_MODELS[name]
    if spec is None:
        return StudyNetwork(task_aware=False)
    return ScalingMLP(*spec)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Batch:
    """Concatenated per-task batch: observations, task ids, taken actions, regression targets."""

    obs: Tensor
    task_ids: Tensor
    actions: Tensor
    targets: Tensor
    task_sizes: list[int]


def make_batches(
    model: nn.Module, num_tasks: int, per_task: int, count: int, seed: int = 0
) -> list[Batch]:
    """``count`` random batches, cycled through by the timing loop (no data cost in the step).

    Targets differ in mean per task so that the task gradients really differ (and conflict
    sometimes), as TD targets of different environments do. Drawn on the CPU (the same numbers
    on every device), then put where the model is.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    in_dim = _input_dim(model)
    size = num_tasks * per_task
    task_ids = torch.arange(num_tasks).repeat_interleave(per_task)
    offsets = torch.randn(num_tasks, generator=generator).repeat_interleave(per_task)
    batches = []
    for _ in range(count):
        batches.append(
            Batch(
                obs=torch.randn(size, in_dim, generator=generator).to(device),
                task_ids=task_ids.to(device),
                actions=torch.randint(NUM_ACTIONS, (size,), generator=generator).to(device),
                targets=(offsets + torch.randn(size, generator=generator)).to(device),
                task_sizes=[per_task] * num_tasks,
            )
        )
    return batches


def task_losses(model: nn.Module, batch: Batch) -> list[Tensor]:
    """One forward pass over the concatenated batch; per task, the MSE of ``Q(s)[a]`` on its slice.

    This mirrors a DQN TD loss (``Q(s)[a]`` against a target) without the target network's
    forward pass, which would cost every method the same and only dilute the ratios.
    """
    q_taken = model(batch.obs, batch.task_ids).gather(1, batch.actions[:, None]).squeeze(1)
    per_sample = (q_taken - batch.targets).square()
    return [chunk.mean() for chunk in per_sample.split(batch.task_sizes)]


def _input_dim(model: nn.Module) -> int:
    if isinstance(model, StudyNetwork):
        return STATE_DIM
    return model.hidden[0].in_features
