"""One replay ring buffer per task, in preallocated NumPy arrays.

Every method (blind or aware) samples the same number of transitions from each task, so
no task can crowd the others out of replay and each task loss is estimated from its own
data. Arrays rather than a deque of tuples: sampling a deque was measured 4-20x slower.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    obs: np.ndarray  # float32 [B, obs_dim]
    actions: np.ndarray  # int64 [B]
    rewards: np.ndarray  # float32 [B]
    next_obs: np.ndarray  # float32 [B, obs_dim]
    terminated: np.ndarray  # float32 [B]: 1 only for a real end, never for a time-out


class PerTaskReplayBuffer:
    def __init__(
        self,
        num_tasks: int,
        total_capacity: int,
        obs_dim: int,
        rng: np.random.Generator | None = None,
    ):
        self.num_tasks = num_tasks
        self.capacity = total_capacity // num_tasks  # 100,000 // 3 = 33,333 per task
        self.obs_dim = obs_dim
        self.rng = rng if rng is not None else np.random.default_rng()
        shape = (num_tasks, self.capacity)
        self.obs = np.zeros((*shape, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((*shape, obs_dim), dtype=np.float32)
        self.actions = np.zeros(shape, dtype=np.int64)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.terminated = np.zeros(shape, dtype=np.float32)
        self.sizes = np.zeros(num_tasks, dtype=np.int64)  # transitions held, <= capacity
        self.positions = np.zeros(num_tasks, dtype=np.int64)  # next slot to write

    def add(self, task_id, obs, action, reward, next_obs, terminated) -> None:
        i = self.positions[task_id]
        self.obs[task_id, i] = obs
        self.actions[task_id, i] = action
        self.rewards[task_id, i] = reward
        self.next_obs[task_id, i] = next_obs
        self.terminated[task_id, i] = terminated
        self.positions[task_id] = (i + 1) % self.capacity  # overwrite the oldest when full
        self.sizes[task_id] = min(self.sizes[task_id] + 1, self.capacity)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def size(self, task_id: int) -> int:
        return int(self.sizes[task_id])

    def is_warm(self, min_size: int = 2_000) -> bool:
        """True once EVERY task holds `min_size` transitions (the warm-up rule)."""
        return bool((self.sizes >= min_size).all())

    def _indices(self, task_id: int, batch_size: int) -> np.ndarray:
        if self.sizes[task_id] == 0:
            raise ValueError(f"task {task_id} has no transitions to sample")
        # Uniform, with replacement (as in DQN): cheap and unbiased.
        return self.rng.integers(0, self.sizes[task_id], size=batch_size)

    def sample(self, task_id: int, batch_size: int) -> Batch:
        idx = self._indices(task_id, batch_size)
        return Batch(
            self.obs[task_id, idx],
            self.actions[task_id, idx],
            self.rewards[task_id, idx],
            self.next_obs[task_id, idx],
            self.terminated[task_id, idx],
        )

    def sample_all(self, batch_size: int) -> Batch:
        """`batch_size` transitions from each task, task-major: rows [t*B, (t+1)*B) are task t.

        Equivalent to concatenating `sample(t, batch_size)` for t = 0, 1, 2 (same RNG draws),
        with one fancy-indexing per array instead of three.
        """
        tasks = np.repeat(np.arange(self.num_tasks), batch_size)
        idx = np.concatenate([self._indices(t, batch_size) for t in range(self.num_tasks)])
        return Batch(
            self.obs[tasks, idx],
            self.actions[tasks, idx],
            self.rewards[tasks, idx],
            self.next_obs[tasks, idx],
            self.terminated[tasks, idx],
        )

    # --- checkpointing: only the filled part of each array is saved --------------------
    def state_dict(self) -> dict:
        n = int(self.sizes.max())
        # Tensors rather than arrays: torch.save writes their bytes without pickling.
        arrays = {
            name: torch.from_numpy(np.ascontiguousarray(getattr(self, name)[:, :n]))
            for name in ("obs", "next_obs", "actions", "rewards", "terminated")
        }
        return dict(
            capacity=self.capacity,
            sizes=self.sizes.copy(),
            positions=self.positions.copy(),
            rng=self.rng.bit_generator.state,
            **arrays,
        )

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"capacity {state['capacity']} != {self.capacity}")
        n = state["obs"].shape[1]
        for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
            getattr(self, name)[:, :n] = state[name].numpy()
        self.sizes[:] = state["sizes"]
        self.positions[:] = state["positions"]
        self.rng.bit_generator.state = state["rng"]
