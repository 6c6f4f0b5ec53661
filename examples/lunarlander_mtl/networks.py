"""Q-networks of the study. Parameter counts are part of the spec and are tested:

- QNetwork(task_aware=False): 8 -> 256 -> 128 -> 4                         35,716
- QNetwork(task_aware=True):  [8 + Embedding(3, 8)] -> 256 -> 128 -> 4    37,788
- BRCNetwork: [8 + Embedding(3, 32)] -> 256, 2 residual blocks, 4 x 21    296,884
  (a categorical value distribution over 21 atoms per action, C51-style)

Every network takes `(obs [B, 8] float32, task_ids [B] int64)`; the blind one ignores the
task ids, so the three share one training loop. `q_values` gives expected values [B, 4].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from config import Config
from envs import NUM_ACTIONS, NUM_TASKS, OBS_DIM
from torch import nn


class QNetwork(nn.Module):
    def __init__(self, task_aware: bool, embedding_dim: int = 8, num_tasks: int = NUM_TASKS):
        super().__init__()
        self.task_aware = task_aware
        in_dim = OBS_DIM
        if task_aware:
            self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
            in_dim += embedding_dim
        self.fc1 = nn.Linear(in_dim, 256)
        self.fc2 = nn.Linear(256, 128)  # GradNorm balances gradient norms at this layer
        self.fc3 = nn.Linear(128, NUM_ACTIONS)

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if self.task_aware:
            obs = torch.cat([obs, self.task_embedding(task_ids)], dim=-1)
        x = F.relu(self.fc1(obs))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def q_values(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self(obs, task_ids)


class ResidualBlock(nn.Module):
    """x + Linear(ReLU(LayerNorm(Linear(x))))."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.norm(self.fc1(x))))


class BRCNetwork(nn.Module):
    """BRC-style wide residual critic with a categorical (distributional) head."""

    def __init__(
        self,
        embedding_dim: int = 32,
        num_atoms: int = 21,
        v_min: float = -300.0,
        v_max: float = 300.0,
        num_tasks: int = NUM_TASKS,
        width: int = 256,
    ):
        super().__init__()
        self.num_atoms = num_atoms
        self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
        self.fc_in = nn.Linear(OBS_DIM + embedding_dim, width)
        self.norm_in = nn.LayerNorm(width)
        self.blocks = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.head = nn.Linear(width, NUM_ACTIONS * num_atoms)
        # A buffer, not a parameter: moves with .to() and is saved, but is not trained.
        self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the return distribution, [B, actions, atoms]."""
        x = torch.cat([obs, self.task_embedding(task_ids)], dim=-1)
        x = F.relu(self.norm_in(self.fc_in(x)))
        x = self.blocks(x)
        return self.head(x).view(-1, NUM_ACTIONS, self.num_atoms)

    def q_values(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return (self(obs, task_ids).softmax(dim=-1) * self.support).sum(dim=-1)


def categorical_projection(
    next_probs: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    support: torch.Tensor,
) -> torch.Tensor:
    """Project the distribution of r + gamma * Z(s') onto the fixed support (C51, Alg. 1).

    next_probs [B, N] are the probabilities of Z(s', a*); each shifted atom r + gamma * z_j
    (just r at a terminal state) is clipped to [v_min, v_max] and its mass is split between
    the two nearest atoms in proportion to closeness. Returns target probabilities [B, N];
    each row sums to 1 because every atom's mass is split, never dropped.
    """
    v_min, v_max = support[0].item(), support[-1].item()
    delta = (v_max - v_min) / (support.numel() - 1)
    shifted = rewards[:, None] + gamma * (1.0 - terminated[:, None]) * support[None, :]
    b = (shifted.clamp(v_min, v_max) - v_min) / delta  # fractional atom index in [0, N-1]
    lower, upper = b.floor(), b.ceil()
    # When b lands exactly on an atom, lower == upper and all of the mass goes there.
    lower_weight = upper - b + (lower == upper).to(b.dtype)
    upper_weight = b - lower
    target = torch.zeros_like(next_probs)
    target.scatter_add_(1, lower.long(), next_probs * lower_weight)
    target.scatter_add_(1, upper.long(), next_probs * upper_weight)
    return target


def make_network(cfg: Config) -> nn.Module:
    if cfg.network == "blind":
        return QNetwork(task_aware=False)
    if cfg.network == "aware":
        return QNetwork(task_aware=True, embedding_dim=cfg.task_embedding_dim)
    if cfg.network == "brc":
        return BRCNetwork(cfg.task_embedding_dim, cfg.num_atoms, cfg.v_min, cfg.v_max)
    raise ValueError(f"unknown network {cfg.network!r}: expected blind, aware or brc")


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
