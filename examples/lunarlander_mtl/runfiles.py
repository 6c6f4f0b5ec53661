"""A run's folder: who may write it, what a start or `--resume` may do with it, and its files.

    runs/<config>/seed-<n>/
        config.json    the run's Config (what --resume must match)
        episodes.csv   one row per training episode
        eval.csv       one row per evaluation episode
        checkpoint.pt  everything needed to continue exactly; counts the CSV rows it covers
        summary.json   written once the run is finished
        .lock          held by the process writing the run

Rules: nothing a user has is deleted without `--overwrite`; a run folder is written by one
process at a time; a resumed run's CSVs are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from config import BOOKKEEPING_FIELDS, Config

LOCK_NAME = ".lock"
# What a run writes itself. A folder holding only these (and no checkpoint yet) is a run
# stopped before its first checkpoint: `--resume` may start it again without losing anything.
OWN_FILES = frozenset(
    {
        "config.json",
        "episodes.csv",
        "eval.csv",
        "summary.json",
        "checkpoint.pt.tmp",
        "tensorboard",
        LOCK_NAME,
    }
)


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says why and what to do."""


# --- one writer per run folder ----------------------------------------------------------

try:
    import fcntl

    def _try_lock(f) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def _unlock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _try_lock(f) -> bool:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


class RunLock:
    """An exclusive lock on a run folder (`<run_dir>/.lock`), released when the process ends.

    The operating system holds the lock, not the file: a killed process leaves no stale lock.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is
        if not _try_lock(f):
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunError(
                f"{self.run_dir} is being written by {owner}: a run folder takes one process "
                "at a time. Wait for it to finish, or stop it (Ctrl-C) before resuming."
            )
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            _unlock(self._file)
            self._file.close()
            self._file = None

    def held_elsewhere(self) -> str | None:
        """Who holds the lock now (None if nobody); takes and drops it to find out."""
        if not self.path.exists():
            return None
        try:
            self.acquire()
        except RunError as err:
            return str(err)
        self.release()
        return None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- files --------------------------------------------------------------------------------


class CsvLog:
    """Append rows to a CSV file (LF line endings), flushed at once: a kill loses no row."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(columns)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, lineterminator="\n")
            for row in rows:
                writer.writerow(
                    {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                )


def check_log(path: Path, columns: list[str], num_rows: int, repair: bool = False) -> None:
    """Check that `path` holds the header and `num_rows` whole rows a checkpoint counts.

    Rows after those (written after the last checkpoint, by work a resume redoes) are
    dropped when `repair` is True. A missing or damaged row among the counted ones cannot be
    repaired: `RunError`. The kept rows are rewritten with LF line endings (files of older
    versions used CRLF), so a resumed log is byte-identical to an uninterrupted one.
    """
    what = "the checkpoint counts"
    if not path.exists():
        raise RunError(f"{path} is missing but {what} {num_rows} rows in it. {_RESTART}")
    lines = path.read_bytes().split(b"\n")
    # Every counted row and the header end with a line ending; what follows is newer.
    if len(lines) < num_rows + 2:
        raise RunError(
            f"{path} holds {max(len(lines) - 2, 0)} whole rows but {what} {num_rows}: "
            f"rows were lost. {_RESTART}"
        )
    kept = [line.removesuffix(b"\r").decode("utf-8", "replace") for line in lines[: num_rows + 1]]
    header = kept[0].split(",")
    if header != columns:
        raise RunError(f"{path}: its header is not the expected one ({header[:4]}...). {_RESTART}")
    for number, text in enumerate(kept[1:], start=1):
        fields = next(csv.reader([text]))
        if len(fields) != len(columns):
            raise RunError(
                f"{path}: row {number} of the {num_rows} {what} has {len(fields)} fields, not "
                f"{len(columns)} (damaged or merged with another row). {_RESTART}"
            )
        if columns[0] == "episode" and fields[0] != str(number - 1):
            raise RunError(
                f"{path}: row {number} is episode {fields[0]!r}, expected {number - 1} "
                f"(a duplicated or missing episode). {_RESTART}"
            )
    if repair:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            f.write("\n".join(kept) + "\n")
        os.replace(tmp, path)


_RESTART = (
    "The run cannot continue consistently: start it again with --overwrite (this deletes the "
    "run folder), or restore the file from a backup."
)


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a kill leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("q_net", "target_net", "method", "buffer", "state")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint, or `RunError` naming the damaged file and what to do."""
    problem = None
    if path.stat().st_size == 0:
        problem = "it is empty"
    elif not zipfile.is_zipfile(path):
        problem = "it is not a complete checkpoint (truncated or overwritten)"
    else:
        try:
            ckpt = torch.load(path, weights_only=False)  # our own file: trusted
        except Exception as err:  # any unpickling failure means the file is damaged
            problem = f"it cannot be read ({type(err).__name__}: {err})"
        else:
            if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
                problem = "it does not hold a run's checkpoint"
            else:
                return ckpt
    raise RunError(
        f"{path} is damaged: {problem}. Checkpoints are written to a temporary file and then "
        "renamed, so a crash cannot leave one half-written; the file was changed afterwards "
        "(disk error, copy, another program). Restore it from a backup, or start the run "
        "again with --overwrite (this deletes the run folder)."
    )


# --- what a start or a resume will do with a run folder ------------------------------------


@dataclass
class RunPlan:
    """What `train()` will do with one run folder, decided before anything is written."""

    cfg: Config
    action: str  # 'start', 'restart' (own files only), 'overwrite', 'continue', 'keep'
    detail: str = ""
    checkpoint: dict | None = field(default=None, repr=False)  # read when continuing

    def describe(self) -> str:
        text = f"{self.cfg.config_name} seed {self.cfg.seed}: {self.action}"
        return f"{text} ({self.detail})" if self.detail else text


def folder_contents(run_dir: Path) -> set[str]:
    if not run_dir.is_dir():
        return set()
    return {p.name for p in run_dir.iterdir()} - {LOCK_NAME}


def saved_config_differs(cfg: Config, run_dir: Path) -> dict:
    """Fields (other than bookkeeping) whose saved value differs: {field: (saved, new)}."""
    path = run_dir / "config.json"
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} cannot be read ({err}). {_RESTART}") from err
    new = json.loads(cfg.to_json())
    # A field missing from the saved config is newer than the run, which ran as its default.
    defaults = {f.name: f.default for f in fields(Config)}
    return {
        k: (saved.get(k, defaults[k]), v)
        for k, v in new.items()
        if k not in BOOKKEEPING_FIELDS and saved.get(k, defaults[k]) != v
    }


def plan_run(
    cfg: Config,
    resume: bool,
    overwrite: bool,
    columns: dict[str, list[str]],
    check_lock: bool = True,
) -> RunPlan:
    """Decide what may be done with `cfg.run_dir`, or raise `RunError` saying why not.

    `columns` maps each CSV log's name to its header. With `resume`, a checkpoint and the
    logs it counts are read in full, so damage is found before any training starts.
    `check_lock=False` when the caller holds the folder's lock itself.
    """
    run_dir = cfg.run_dir
    holder = RunLock(run_dir).held_elsewhere() if check_lock else None
    if holder:
        raise RunError(holder)
    contents = folder_contents(run_dir)
    if not contents:
        return RunPlan(cfg, "start")
    if overwrite and not (resume and "checkpoint.pt" in contents):
        return RunPlan(cfg, "overwrite", f"deletes {len(contents)} entries of {run_dir}")
    if not resume:
        would = "continue it" if "checkpoint.pt" in contents else "refuse"
        raise RunError(
            f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to "
            f"delete it and start again (--resume would {would})."
        )
    differs = saved_config_differs(cfg, run_dir)
    if differs:
        raise RunError(
            f"--resume with a different config than the one saved in {run_dir}: "
            f"{ {k: f'{old} -> {new}' for k, (old, new) in differs.items()} }. Resume with "
            "the saved settings, or choose another --runs-dir."
        )
    if "checkpoint.pt" not in contents:
        foreign = contents - OWN_FILES
        if "summary.json" in contents and not foreign:
            return RunPlan(cfg, "keep", "finished; no checkpoint kept")
        if foreign:
            raise RunError(
                f"{run_dir} has no checkpoint.pt to resume from and holds files a run does not "
                f"write ({', '.join(sorted(foreign))}). Nothing was changed. Move them away, "
                "or pass --overwrite to delete the folder and start again."
            )
        return RunPlan(cfg, "restart", "stopped before its first checkpoint")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    state = ckpt["state"]
    for name, header in columns.items():
        rows = state["episode_rows"] if name == "episodes.csv" else state["eval_rows"]
        check_log(run_dir / name, header, rows)
    total = cfg.episodes_per_task * len(state["recent_returns"])
    if state["finished"]:
        return RunPlan(cfg, "keep", "finished")
    return RunPlan(cfg, "continue", f"after episode {state['episode']} of {total}", ckpt)


def prepare_folder(plan: RunPlan) -> None:
    """Empty the folder where the plan starts from scratch (the lock file stays)."""
    run_dir = plan.cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.action not in ("overwrite", "restart"):
        return
    for name in folder_contents(run_dir):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def tidy_killed_run(run_dir: Path, columns: dict[str, list[str]]) -> str:
    """Bring the folder of a run killed mid-write back to its last checkpoint; say what it holds.

    Only for a run whose writer is dead: removes a temporary checkpoint and the log rows the
    checkpoint does not count (the resume would redo their work anyway).
    """
    (run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return "killed before its first checkpoint (--resume starts it again)"
    try:
        state = load_checkpoint(path)["state"]
        for name, header in columns.items():
            rows = state["episode_rows"] if name == "episodes.csv" else state["eval_rows"]
            check_log(run_dir / name, header, rows, repair=True)
    except RunError as err:
        return f"killed; {err}"
    return f"killed, its checkpoint holds {state['episode']} episodes"
