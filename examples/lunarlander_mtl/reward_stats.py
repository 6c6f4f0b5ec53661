"""Per-task reward statistics under a uniformly random policy, the replay warm-up's policy.

Per-task reward scaling (one of the improvements issue 5 lists) divides each task's rewards by
a scale of its own so that no task's TD loss dominates the shared update. It can only matter if
the tasks' rewards differ in scale. This measures whether they do, on the data every run starts
from (the first transitions of each buffer come from a random policy):

    python examples/lunarlander_mtl/reward_stats.py \
        --out examples/lunarlander_mtl/results/reward_stats.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from envs import NUM_ACTIONS, TASK_NAMES, make_env


def reward_stats(task: str, steps: int, seed: int) -> dict[str, float]:
    """Reward and episode-return statistics of ``steps`` random-policy steps on ``task``."""
    env = make_env(task)
    rng = np.random.default_rng(seed)
    rewards, returns, episode = [], [], 0
    while len(rewards) < steps:
        env.reset(seed=seed + episode)
        episode += 1
        episode_return, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(int(rng.integers(NUM_ACTIONS)))
            rewards.append(float(reward))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    env.close()
    r = np.array(rewards)
    return {
        "steps": len(r),
        "episodes": len(returns),
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "reward_abs_p99": float(np.percentile(np.abs(r), 99)),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000, help="steps per task (whole episodes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the statistics to this JSON file")
    args = parser.parse_args(argv)
    stats = {task: reward_stats(task, args.steps, args.seed) for task in TASK_NAMES}
    for task, s in stats.items():
        print(
            f"{task:9s} reward std {s['reward_std']:6.2f}  mean {s['reward_mean']:6.2f}  "
            f"return {s['return_mean']:7.1f} +- {s['return_std']:5.1f}  ({s['episodes']} episodes)"
        )
    if args.out is not None:
        options = {"steps": args.steps, "seed": args.seed}
        args.out.write_text(json.dumps({"options": options, **stats}, indent=2) + "\n")
    return stats


if __name__ == "__main__":
    main()
