"""A run is never lost or corrupted: bad settings, existing or damaged run folders, two
writers, and resumed logs (byte for byte)."""

import json

import pytest
import torch
import train
from config import QUICK_OVERRIDES, make_config
from replay import PerTaskReplayBuffer
from runfiles import RunError, RunLock


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in train() can catch it."""


def quick_config(runs_dir, name="shared-aware", **overrides):
    settings = dict(seed=3, runs_dir=str(runs_dir), progress=False, tensorboard=False)
    return make_config(name, **{**settings, **QUICK_OVERRIDES, "episodes_per_task": 3, **overrides})


def kill_after_adds(monkeypatch, count):
    calls = {"n": 0}
    original = PerTaskReplayBuffer.add

    def add(self, *args):
        calls["n"] += 1
        if calls["n"] == count:
            raise Killed
        original(self, *args)

    monkeypatch.setattr(PerTaskReplayBuffer, "add", add)


def interrupted_run(tmp_path, monkeypatch, adds=500, **overrides):
    cfg = quick_config(tmp_path, **overrides)
    with monkeypatch.context() as patch:
        kill_after_adds(patch, adds)
        with pytest.raises(Killed):
            train.train(cfg)
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cfg = quick_config(tmp_path_factory.mktemp("whole"))
    summary = train.train(cfg)
    assert summary["env_steps"] > 600  # room for the kills below
    return {name: (cfg.run_dir / name).read_bytes() for name in ("episodes.csv", "eval.csv")}


def cli(tmp_path, *args):
    return ["--runs-dir", str(tmp_path), "--no-tensorboard", "--no-progress", *args]


QUICK_CLI = ["--episodes-per-task", "3", "--min-replay-size", "100", "--max-episode-steps", "150"]
QUICK_CLI += ["--eval-every", "2", "--eval-episodes", "2", "--final-eval-episodes", "2"]


# --- settings are checked before anything is written --------------------------------------


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(seed=-1), "--seed -1"),
        (dict(seed=2**32), "--seed"),
        (dict(checkpoint_every=0), "--checkpoint-every 0"),
        (dict(episodes_per_task=0), "--episodes-per-task 0"),
        (dict(gradnorm_lr=float("nan")), "--gradnorm-lr nan"),
        (dict(gradnorm_alpha=float("inf")), "--gradnorm-alpha inf"),
        (dict(lr=0.0), "--lr 0.0"),
        (dict(gamma=1.5), "--gamma 1.5"),
        (dict(target_tau=0.0), "--target-tau 0.0"),
        (dict(target_update="polyak"), "--target-update 'polyak'"),
        (dict(method="pc-grad"), "--method 'pc-grad'"),
        (dict(update_every=0), "--update-every 0"),
        (dict(min_replay_size=40_000), "--min-replay-size 40000"),
        (dict(epsilon_min=0.5, epsilon_start=0.1), "--epsilon-min 0.5"),
        (dict(v_min=1.0, v_max=-1.0), "--v-min"),
    ],
)
def test_bad_settings_are_refused_before_the_run_folder_exists(tmp_path, overrides, flag):
    cfg = quick_config(tmp_path, **overrides)
    assert any(problem.startswith(flag) for problem in cfg.problems()), cfg.problems()
    with pytest.raises(ValueError, match="invalid configuration"):
        train.train(cfg)
    assert not (tmp_path / "shared-aware").exists()


def test_the_named_configurations_are_valid():
    for name in train.CONFIGS:
        assert make_config(name).problems() == []


def test_cli_refuses_a_negative_seed_before_any_folder(tmp_path):
    with pytest.raises(SystemExit, match=r"--seed -1: seeds are integers from 0"):
        train.main(cli(tmp_path, "--config", "shared-aware", "--seed", "-1", *QUICK_CLI))
    with pytest.raises(SystemExit, match=r"--checkpoint-every 0: must be at least 1"):
        train.main(cli(tmp_path, "--config", "shared-aware", "--checkpoint-every", "0"))
    assert list(tmp_path.iterdir()) == []


# --- existing runs: checked up front, never deleted without --overwrite -------------------


def test_resume_never_deletes_a_folder_without_checkpoint(tmp_path):
    cfg = quick_config(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "notes.txt").write_text("mine")
    (cfg.run_dir / "summary.json").write_text("{}")
    with pytest.raises(RunError, match=r"no checkpoint\.pt.*notes\.txt.*--overwrite"):
        train.train(cfg, resume=True)
    assert (cfg.run_dir / "notes.txt").read_text() == "mine"
    train.train(cfg, resume=True, overwrite=True)  # explicit: delete and start again
    assert not (cfg.run_dir / "notes.txt").exists()
    assert (cfg.run_dir / "checkpoint.pt").exists()


def test_resume_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path, uninterrupted):
    cfg = quick_config(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(cfg.to_json())
    (cfg.run_dir / "episodes.csv").write_text("episode,task\n")  # what a run wrote itself
    train.train(cfg, resume=True)
    assert (cfg.run_dir / "episodes.csv").read_bytes() == uninterrupted["episodes.csv"]


def test_a_study_checks_every_run_before_training_any(tmp_path):
    taken = quick_config(tmp_path, name="shared-blind", seed=0)
    taken.run_dir.mkdir(parents=True)
    (taken.run_dir / "checkpoint.pt").write_bytes(b"")
    args = cli(tmp_path, "--config", "shared-aware", "shared-blind", "--seed", "0", *QUICK_CLI)
    with pytest.raises(SystemExit, match=r"(?s)Nothing was started.*shared-blind seed 0.*--resume"):
        train.main(args)
    damaged = r"(?s)Nothing was started.*checkpoint\.pt is damaged: it is empty"
    with pytest.raises(SystemExit, match=damaged):
        train.main([*args, "--resume"])
    assert not (tmp_path / "shared-aware").exists()  # the first run was never started


# --- damaged checkpoint or logs -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_names_the_file_and_the_way_out(tmp_path, monkeypatch, damage):
    cfg = interrupted_run(tmp_path, monkeypatch)
    path = cfg.run_dir / "checkpoint.pt"
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x80" * 100}
    path.write_bytes(damaged[damage])
    with pytest.raises(RunError, match=rf"{path}.* is damaged.*--overwrite") as err:
        train.train(cfg, resume=True)
    assert "Traceback" not in str(err.value)
    assert path.read_bytes() == damaged[damage]  # nothing changed


def damage_log(path, how):
    data = path.read_bytes()
    lines = data.split(b"\n")
    if how == "truncated":  # the last counted rows lost
        return b"\n".join(lines[:3]) + b"\n"
    if how == "cut-row":  # the last counted row cut in the middle, no line ending
        return data[: data.rindex(b"\n", 0, len(data) - 1) + 10]
    if how == "merged":  # two counted rows glued together
        return b"\n".join(lines[:2]) + b"," + b"\n".join(lines[2:])
    if how == "duplicated":  # an episode written twice
        return b"\n".join([*lines[:3], lines[2], *lines[4:]])
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "cut-row", "merged", "duplicated"])
def test_logs_that_disagree_with_the_checkpoint_are_refused(tmp_path, monkeypatch, how):
    cfg = interrupted_run(tmp_path, monkeypatch)
    path = cfg.run_dir / "episodes.csv"
    ckpt = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["episode_rows"] >= 4
    path.write_bytes(damage_log(path, how))
    before = path.read_bytes()
    with pytest.raises(RunError, match=rf"{path}.*--overwrite"):
        train.train(cfg, resume=True)
    assert path.read_bytes() == before


def test_rows_newer_than_the_checkpoint_are_dropped_exactly(tmp_path, monkeypatch, uninterrupted):
    cfg = interrupted_run(tmp_path, monkeypatch)
    with open(cfg.run_dir / "episodes.csv", "ab") as f:
        f.write(b"99,standard,0,1.5")  # a row cut by the kill, after the checkpoint
    with open(cfg.run_dir / "eval.csv", "ab") as f:
        f.write(b"2,periodic,standard,0,10000,1.0,5,0\n2,periodic,windy,0,10000,2.")
    train.train(cfg, resume=True)
    for name, expected in uninterrupted.items():
        assert (cfg.run_dir / name).read_bytes() == expected


def test_resumed_logs_are_byte_identical(tmp_path, monkeypatch, uninterrupted):
    cfg = interrupted_run(tmp_path, monkeypatch, adds=590)
    train.train(cfg, resume=True)
    for name, expected in uninterrupted.items():
        data = (cfg.run_dir / name).read_bytes()
        assert b"\r" not in data  # LF line endings throughout
        assert data == expected


def test_logs_of_older_versions_with_crlf_are_resumed_as_lf(tmp_path, monkeypatch, uninterrupted):
    cfg = interrupted_run(tmp_path, monkeypatch, adds=590)
    for name in uninterrupted:
        path = cfg.run_dir / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    train.train(cfg, resume=True)
    for name, expected in uninterrupted.items():
        assert (cfg.run_dir / name).read_bytes() == expected


# --- one writer per run folder --------------------------------------------------------------


def test_a_run_folder_takes_one_process_at_a_time(tmp_path, monkeypatch):
    cfg = interrupted_run(tmp_path, monkeypatch)
    before = (cfg.run_dir / "episodes.csv").read_bytes()
    with RunLock(cfg.run_dir):  # another writer (a separate open file: as another process)
        with pytest.raises(RunError, match="is being written by process"):
            train.train(cfg, resume=True)
        args = cli(tmp_path, "--config", "shared-aware", "--seed", "3", *QUICK_CLI, "--resume")
        with pytest.raises(SystemExit, match=r"(?s)Nothing was started.*being written"):
            train.main(args)
    assert (cfg.run_dir / "episodes.csv").read_bytes() == before
    summary = train.train(cfg, resume=True)  # free again
    assert json.loads((cfg.run_dir / "summary.json").read_text()) == summary
