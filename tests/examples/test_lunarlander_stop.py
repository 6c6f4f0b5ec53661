"""One Ctrl-C or SIGTERM stops a run or the whole study promptly and cleanly, through the
real command line in a separate process: every process ends, nothing half-written is left,
the console says what finished and how to resume, and `--resume` then completes the runs
exactly as an uninterrupted run."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import train
from config import make_config

EXAMPLE_DIR = Path(train.__file__).parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")

SETTINGS = dict(
    episodes_per_task=8,
    min_replay_size=100,
    max_episode_steps=200,
    eval_every=4,
    eval_episodes=2,
    final_eval_episodes=2,
)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
FLAGS += ["--no-tensorboard", "--no-progress", "--seed", "0"]


def launch(runs_dir: Path, *configs: str, workers: int = 2) -> subprocess.Popen:
    """`train.py` in its own process group, as a terminal would run it."""
    return subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "--config",
            *configs,
            "--runs-dir",
            str(runs_dir),
            *FLAGS,
            "--workers",
            str(workers),
        ],
        cwd=EXAMPLE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def rows(run_dir: Path) -> int:
    path = run_dir / "episodes.csv"
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def wait_until_training(proc, run_dirs, min_rows=2, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"train.py ended before it was stopped:\n{proc.stdout.read()}")
        if all(rows(d) >= min_rows for d in run_dirs):
            return
        time.sleep(0.2)
    pytest.fail("no training progress")


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def snapshot(run_dirs) -> dict:
    return {p: p.stat().st_size for d in run_dirs for p in d.iterdir()}


def assert_everything_stopped(workers, run_dirs, timeout=60):
    deadline = time.monotonic() + timeout
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "a worker process is still running"
    before = snapshot(run_dirs)
    time.sleep(2)
    assert snapshot(run_dirs) == before, "something still writes the run folders"
    for d in run_dirs:
        assert not list(d.glob("*.tmp")), "a half-written file was left"


def uninterrupted_logs(tmp_path, name):
    cfg = make_config(
        name,
        seed=0,
        runs_dir=str(tmp_path / "whole"),
        tensorboard=False,
        progress=False,
        **SETTINGS,
    )
    train.train(cfg)
    return {f: (cfg.run_dir / f).read_bytes() for f in ("episodes.csv", "eval.csv")}


def test_one_ctrl_c_stops_a_single_run(tmp_path):
    run_dir = tmp_path / "runs" / "shared-aware" / "seed-0"
    proc = launch(tmp_path / "runs", "shared-aware")
    wait_until_training(proc, [run_dir])
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "shared-aware seed 0: stopped, its checkpoint holds" in output
    assert "--resume" in output and "Traceback" not in output
    assert_everything_stopped([], [run_dir])
    train.main(
        ["--config", "shared-aware", "--runs-dir", str(tmp_path / "runs"), *FLAGS, "--resume"]
    )
    expected = uninterrupted_logs(tmp_path, "shared-aware")
    assert {f: (run_dir / f).read_bytes() for f in expected} == expected


@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c-twice", "sigterm"])
def test_one_signal_stops_the_whole_study(tmp_path, how):
    names = ("shared-aware", "shared-blind", "pcgrad-blind")
    run_dirs = [tmp_path / "runs" / name / "seed-0" for name in names[:2]]
    proc = launch(tmp_path / "runs", *names, workers=2)
    wait_until_training(proc, run_dirs)
    workers = children(proc.pid)
    assert len(workers) >= 2
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)  # `kill <main pid>`
    else:
        os.killpg(proc.pid, signal.SIGINT)
        if how == "ctrl-c-twice":
            time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == (143 if how == "sigterm" else 130), output
    assert "Stopped by SIG" in output and "Traceback" not in output
    assert "not started: 1 runs" in output
    assert "Continue with: python train.py" in output and "--resume" in output
    assert not (tmp_path / "runs" / "pcgrad-blind").exists()
    assert_everything_stopped(workers, run_dirs)
    # What the console says to run completes the study, exactly as if never stopped.
    command = output.split("Continue with: ")[1].splitlines()[0].split()
    summaries = train.main([*command[2:], "--no-report"])
    assert sorted(s["config_name"] for s in summaries) == sorted(names)
    expected = uninterrupted_logs(tmp_path, "shared-blind")
    assert {f: (run_dirs[1] / f).read_bytes() for f in expected} == expected


def test_workers_stop_when_the_main_process_is_killed(tmp_path):
    names = ("shared-aware", "shared-blind")
    run_dirs = [tmp_path / "runs" / name / "seed-0" for name in names]
    proc = launch(tmp_path / "runs", *names, workers=2)
    wait_until_training(proc, run_dirs)
    workers = children(proc.pid)
    proc.kill()  # SIGKILL: no handler runs in the main process
    proc.wait(timeout=30)
    assert_everything_stopped(workers, run_dirs)
    proc.stdout.close()  # the workers shared it: open until they ended
    train.main(["--config", *names, "--runs-dir", str(tmp_path / "runs"), *FLAGS, "--resume"])
    for d in run_dirs:
        assert rows(d) == 3 * SETTINGS["episodes_per_task"]


def test_the_resume_command_names_the_script_as_it_was_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["examples/lunarlander_mtl/train.py", "--seed", "0"])
    assert train.resume_command(["--seed", "0", "--resume"]) == (
        "python examples/lunarlander_mtl/train.py --seed 0 --resume"
    )


def test_a_stop_cancels_no_queued_run(tmp_path, monkeypatch):
    """A stop leaves the queued runs to the workers, which skip them, and cancels no future.

    When its workers are killed (a second Ctrl-C), CPython 3.11's process pool sets an
    exception on every queued future and dies on one that was cancelled (InvalidStateError):
    the remaining futures then never complete and the study waits forever.
    """
    cancelled = []
    real_cancel = concurrent.futures.Future.cancel

    def cancel(future):
        if real_cancel(future):
            cancelled.append(future)
            return True
        return False

    monkeypatch.setattr(concurrent.futures.Future, "cancel", cancel)
    names = ("shared-aware", "shared-blind", "pcgrad-blind", "pcgrad-aware", "gradnorm-blind")
    configs = [
        make_config(
            name, seed=0, runs_dir=str(tmp_path), tensorboard=False, progress=False, **SETTINGS
        )
        for name in names
    ]

    def stop_when_training() -> None:
        deadline = time.monotonic() + 240
        while rows(configs[0].run_dir) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        if rows(configs[0].run_dir) >= 2:  # only while run_many's handler is installed
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_when_training, daemon=True)
    watcher.start()
    outcome = train.run_many(configs, workers=1, resume=False, overwrite=False, progress=False)
    watcher.join()
    assert outcome.stop_reason == "SIGTERM"
    assert len(outcome.stopped) == 1
    assert sorted(cfg.config_name for cfg in outcome.not_started) == sorted(names[1:])
    assert cancelled == []
