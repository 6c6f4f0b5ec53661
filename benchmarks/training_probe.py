"""Environment steps per second of one short run of the LunarLander study's training loop.

Run by the training suite, once per run, in a fresh process:

    python benchmarks/training_probe.py --config pcgrad-blind --episodes-per-task 15 \
        --min-replay-size 500 --runs-dir /tmp/x

It runs ``train()`` of ``examples/lunarlander_mtl/train.py`` unchanged, with the study's
settings except a short schedule, a small warm-up (so that most of the run does gradient
updates), one final evaluation episode and no progress bar or TensorBoard. The training
environments are wrapped in a clock that records when each episode starts and ends; together
with the run's ``episodes.csv`` (which episodes did updates) that gives the steps per second
of the updating phase, without the set-up, the warm-up or the final evaluation.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import gymnasium as gym

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lunarlander_mtl"


class EpisodeClock(gym.Wrapper):
    """Appends ``[start, end, steps]`` per episode to a log shared by the training envs."""

    def __init__(self, env: gym.Env, log: list[list[float]]) -> None:
        super().__init__(env)
        self.log = log

    def reset(self, **kwargs):
        now = time.perf_counter()
        self.log.append([now, now, 0])
        return self.env.reset(**kwargs)

    def step(self, action):
        result = self.env.step(action)
        record = self.log[-1]
        record[1] = time.perf_counter()
        record[2] += 1
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--episodes-per-task", type=int, required=True)
    parser.add_argument("--min-replay-size", type=int, required=True)
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(EXAMPLE))
    import config as example_config
    import networks as example_networks
    import train as example_train
    from envs import NUM_TASKS

    import methods as example_methods

    log: list[list[float]] = []
    make_env = example_train.make_env
    made = 0

    def clocked_make_env(*a, **kw):
        nonlocal made
        env = make_env(*a, **kw)
        made += 1
        # train() builds the NUM_TASKS training envs first, then the evaluation envs.
        return EpisodeClock(env, log) if made <= NUM_TASKS else env

    example_train.make_env = clocked_make_env
    cfg = example_config.make_config(
        args.config,
        seed=args.seed,
        episodes_per_task=args.episodes_per_task,
        min_replay_size=args.min_replay_size,
        final_eval_episodes=1,
        progress=False,
        tensorboard=False,
        runs_dir=args.runs_dir,
    )
    example_train.train(cfg, overwrite=True)

    with open(cfg.run_dir / "episodes.csv", newline="") as f:
        episodes = list(csv.DictReader(f))
    first = next(i for i, row in enumerate(episodes) if int(row["updates"]) > 0)
    steps = sum(record[2] for record in log[first:])
    seconds = log[-1][1] - log[first][0]
    method = example_methods.make_method(cfg, example_networks.make_network(cfg))
    engine = getattr(method.gradnorm or method.optimizer, "engine", None)
    print(
        json.dumps(
            {
                "config": args.config,
                "steps": steps,
                "seconds": seconds,
                "steps_per_s": steps / seconds,
                "updates": sum(int(row["updates"]) for row in episodes[first:]),
                "warmup_episodes": first,
                "engine": "—" if engine is None else type(engine).__name__,
            }
        )
    )


if __name__ == "__main__":
    main()
