"""The three LunarLander tasks, registered as Gymnasium ids.

    import envs, gymnasium as gym
    env = gym.make("gradsurgery/LunarLanderWindy-v0")

All three are discrete `LunarLander-v3` (4 actions, 8-dim state); they differ in physics and
time limit. The time limit is Gymnasium's `TimeLimit` wrapper, which reports a time-out as
`truncated=True, terminated=False`: the agent stores only `terminated` in replay, so a
time-out still bootstraps from the next state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym

ENTRY_POINT = "gymnasium.envs.box2d.lunar_lander:LunarLander"


@dataclass(frozen=True)
class Task:
    name: str
    env_id: str
    max_episode_steps: int
    kwargs: dict = field(default_factory=dict)


TASKS: tuple[Task, ...] = (
    Task("standard", "gradsurgery/LunarLanderStandard-v0", 1000),
    # A tight limit: hovering in the wind until the clock runs out is not a strategy.
    Task(
        "windy",
        "gradsurgery/LunarLanderWindy-v0",
        400,
        dict(enable_wind=True, wind_power=15.0, turbulence_power=1.5),
    ),
    # LunarLander asserts -12 < gravity < 0. At -11.5 the main engine's thrust-to-weight
    # ratio drops from about 1.8 to 1.5, so braking takes longer.
    Task("heavy", "gradsurgery/LunarLanderHeavy-v0", 800, dict(gravity=-11.5)),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
NUM_TASKS = len(TASKS)
NUM_ACTIONS = 4
OBS_DIM = 8


def register_tasks() -> None:
    """Idempotent: importing this module twice must not warn about re-registration."""
    for task in TASKS:
        if task.env_id not in gym.registry:
            gym.register(
                id=task.env_id,
                entry_point=ENTRY_POINT,
                max_episode_steps=task.max_episode_steps,
                kwargs=dict(continuous=False, **task.kwargs),
            )


register_tasks()


def make_env(task: int | str, max_episode_steps: int = 0) -> gym.Env:
    """The task's environment; `max_episode_steps > 0` replaces its time limit."""
    spec = TASKS[task] if isinstance(task, int) else TASKS[TASK_NAMES.index(task)]
    if max_episode_steps > 0:
        return gym.make(spec.env_id, max_episode_steps=max_episode_steps)
    return gym.make(spec.env_id)
