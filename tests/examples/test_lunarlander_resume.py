"""Killing a run at any point and resuming it gives exactly the uninterrupted run."""

import json

import pytest
import train
from config import QUICK_OVERRIDES, make_config
from replay import PerTaskReplayBuffer
from runfiles import RunError


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in train() can catch it."""


def quick_config(name, runs_dir, **overrides):
    return make_config(
        name,
        seed=4,
        runs_dir=str(runs_dir),
        progress=False,
        tensorboard=False,
        **{**QUICK_OVERRIDES, **overrides},
    )


def outputs(cfg):
    return {name: (cfg.run_dir / name).read_text() for name in ("episodes.csv", "eval.csv")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    results = {}
    for name in ("pcgrad-aware", "gradnorm-blind", "brc"):
        cfg = quick_config(name, tmp_path_factory.mktemp(name))
        summary = train.train(cfg)
        results[name] = outputs(cfg), summary
    return results


def kill_after_adds(monkeypatch, count):
    """Kill the run in the middle of an episode, at the `count`-th environment step."""
    calls = {"n": 0}
    original = PerTaskReplayBuffer.add

    def add(self, *args):
        calls["n"] += 1
        if calls["n"] == count:
            raise Killed
        original(self, *args)

    monkeypatch.setattr(PerTaskReplayBuffer, "add", add)


def kill_at_checkpoint(monkeypatch, count):
    """Kill the run after an episode was logged but before its checkpoint was written."""
    calls = {"n": 0}
    original = train.save_atomic

    def save(obj, path):
        calls["n"] += 1
        if calls["n"] == count:
            path.with_name(path.name + ".tmp").write_bytes(b"half-written garbage")
            raise Killed
        original(obj, path)

    monkeypatch.setattr(train, "save_atomic", save)


@pytest.mark.parametrize("name", ["pcgrad-aware", "gradnorm-blind", "brc"])
@pytest.mark.parametrize("how", ["mid-episode", "before-checkpoint", "twice"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, uninterrupted, name, how):
    cfg = quick_config(name, tmp_path)
    with monkeypatch.context() as patch:
        if how == "before-checkpoint":
            kill_at_checkpoint(patch, 8)  # after episode 8 (updates have started)
        else:
            kill_after_adds(patch, 700)  # mid-way through a later episode
        with pytest.raises(Killed):
            train.train(cfg)
    assert len((cfg.run_dir / "episodes.csv").read_text().splitlines()) > 2
    if how == "twice":  # killed again, this time after the final evaluation began
        with monkeypatch.context() as patch:
            kill_at_checkpoint(patch, 100)
            original_evaluate = train.evaluate

            def evaluate(*args, **kwargs):
                if kwargs["phase"] == "final":
                    raise Killed
                return original_evaluate(*args, **kwargs)

            patch.setattr(train, "evaluate", evaluate)
            with pytest.raises(Killed):
                train.train(cfg, resume=True)
    summary = train.train(cfg, resume=True)
    expected_outputs, expected_summary = uninterrupted[name]
    assert outputs(cfg) == expected_outputs
    for key in ("final_return_avg", "last100_return_avg", "env_steps", "updates"):
        assert summary[key] == expected_summary[key]


def test_checkpoint_every_few_episodes_redoes_the_lost_ones(tmp_path, monkeypatch, uninterrupted):
    cfg = quick_config("pcgrad-aware", tmp_path, checkpoint_every=5)
    rows = uninterrupted["pcgrad-aware"][0]["episodes.csv"].splitlines()[1:]
    steps_after_8_episodes = int(rows[7].split(",")[6])  # the env_steps column
    with monkeypatch.context() as patch:
        kill_after_adds(patch, steps_after_8_episodes + 3)  # during episode 9
        with pytest.raises(Killed):
            train.train(cfg)
    logged = len((cfg.run_dir / "episodes.csv").read_text().splitlines()) - 1
    assert logged == 8  # 3 of them are newer than the last checkpoint (after 5)
    train.train(cfg, resume=True)
    assert outputs(cfg) == uninterrupted["pcgrad-aware"][0]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    cfg = quick_config("shared-blind", tmp_path)
    summary = train.train(cfg)
    before = outputs(cfg)
    assert train.train(cfg, resume=True) == summary
    assert outputs(cfg) == before
    assert json.loads((cfg.run_dir / "summary.json").read_text()) == summary


def test_existing_runs_are_protected(tmp_path):
    cfg = quick_config("shared-blind", tmp_path)
    train.train(cfg)
    with pytest.raises(RunError, match="--resume"):
        train.train(cfg)
    with pytest.raises(RunError, match="different config"):
        train.train(quick_config("shared-blind", tmp_path, lr=1e-3), resume=True)
    train.train(cfg, overwrite=True)  # explicit: start again
