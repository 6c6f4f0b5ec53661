import gymnasium as gym
import numpy as np
import pytest
from envs import TASK_NAMES, TASKS, make_env

LIMITS = {"standard": 1000, "windy": 400, "heavy": 800}
NOOP = 0


def test_task_order_and_registered_ids():
    assert TASK_NAMES == ("standard", "windy", "heavy")
    for task in TASKS:
        assert task.env_id in gym.registry
        env = gym.make(task.env_id)  # works with plain gym.make once envs is imported
        assert env.action_space.n == 4 and env.observation_space.shape == (8,)
        assert not env.unwrapped.continuous
        env.close()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_time_limits(name):
    env = make_env(name)
    assert env.spec.max_episode_steps == LIMITS[name]
    assert make_env(name, max_episode_steps=7).spec.max_episode_steps == 7


def test_physics_of_each_task():
    standard, windy, heavy = (make_env(n).unwrapped for n in TASK_NAMES)
    for env in (standard, windy, heavy):
        env.reset(seed=0)
    assert not standard.enable_wind and standard.gravity == -10.0
    assert windy.enable_wind and windy.wind_power == 15.0 and windy.turbulence_power == 1.5
    assert windy.gravity == -10.0
    assert heavy.gravity == -11.5 and not heavy.enable_wind
    assert heavy.world.gravity[1] == pytest.approx(-11.5)
    assert standard.world.gravity[1] == pytest.approx(-10.0)


def rollout(env, steps, seed=0):
    obs, _ = env.reset(seed=seed)
    trajectory = [obs]
    for _ in range(steps):
        obs, *_ = env.step(NOOP)
        trajectory.append(obs)
    return np.array(trajectory)


def test_wind_and_gravity_change_the_dynamics():
    standard, windy, heavy = (make_env(n) for n in TASK_NAMES)
    s, w, h = rollout(standard, 30), rollout(windy, 30), rollout(heavy, 30)
    assert not np.allclose(s[-1, 2], w[-1, 2])  # wind pushes sideways (x velocity)
    assert h[-1, 3] < s[-1, 3]  # falls faster (y velocity more negative)
    np.testing.assert_array_equal(rollout(windy, 30), w)  # seeded: reproducible


@pytest.mark.parametrize("name", TASK_NAMES)
def test_time_out_is_truncation_not_termination(name):
    env = make_env(name, max_episode_steps=5)
    env.reset(seed=0)
    for step in range(5):
        _, _, terminated, truncated, _ = env.step(NOOP)
        assert not terminated
        assert truncated == (step == 4)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_crash_is_termination_not_truncation(name):
    env = make_env(name)
    env.reset(seed=0)
    for _ in range(LIMITS[name]):
        _, _reward, terminated, truncated, _ = env.step(NOOP)  # free fall: crash or land
        if terminated or truncated:
            break
    assert terminated and not truncated
