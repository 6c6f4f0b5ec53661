"""Greedy evaluation on fixed seeds.

Evaluation episode i of every run, configuration and checkpoint resets with seed
`eval_seed + i`, so two configurations are compared on the very same landers and terrain
(a paired comparison), and the first 10 final-evaluation episodes are the same episodes as
every periodic evaluation. Evaluation uses its own environments: it never touches the
training environments, the replay buffer or any training RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

SUCCESS_RETURN = 200.0  # LunarLander counts an episode of return >= 200 as solved

EVAL_COLUMNS = [
    "episodes_per_task",  # training episodes per task completed when evaluated
    "phase",  # "periodic" (every eval_every) or "final"
    "task",
    "eval_episode",
    "seed",
    "return",
    "length",
    "success",
]


@torch.inference_mode()
def run_greedy_episode(q_net: nn.Module, env: gym.Env, task_id: int, seed: int):
    task = torch.tensor([task_id])
    obs, _ = env.reset(seed=seed)
    total, length, done = 0.0, 0, False
    while not done:
        action = int(q_net.q_values(torch.from_numpy(obs).unsqueeze(0), task).argmax())
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        length += 1
        done = terminated or truncated
    return total, length


def evaluate(
    q_net: nn.Module,
    envs: list[gym.Env],
    task_names: tuple[str, ...],
    num_episodes: int,
    eval_seed: int,
    episodes_per_task: int,
    phase: str,
    check_stop: Callable[[], None] | None = None,
) -> list[dict]:
    """One row per (task, episode) in the format of eval.csv.

    `check_stop` is called before every episode (it raises to stop the evaluation).
    """
    rows = []
    for task_id, (env, name) in enumerate(zip(envs, task_names, strict=True)):
        for i in range(num_episodes):
            if check_stop is not None:
                check_stop()
            ret, length = run_greedy_episode(q_net, env, task_id, eval_seed + i)
            rows.append(
                {
                    "episodes_per_task": episodes_per_task,
                    "phase": phase,
                    "task": name,
                    "eval_episode": i,
                    "seed": eval_seed + i,
                    "return": ret,
                    "length": length,
                    "success": int(ret >= SUCCESS_RETURN),
                }
            )
    return rows


def summarize(rows: list[dict], task_names: tuple[str, ...]) -> dict[str, float]:
    """Per-task mean return and success rate, and their averages over the tasks."""
    out = {}
    for name in task_names:
        returns = np.array([r["return"] for r in rows if r["task"] == name])
        out[f"return_{name}"] = float(returns.mean())
        out[f"success_{name}"] = float((returns >= SUCCESS_RETURN).mean())
    out["return_avg"] = float(np.mean([out[f"return_{n}"] for n in task_names]))
    out["success_avg"] = float(np.mean([out[f"success_{n}"] for n in task_names]))
    return out
