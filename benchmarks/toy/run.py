"""The toy problem of CAGrad and Nash-MTL with every method of gradsurgery: one command.

    python benchmarks/toy/run.py                         # both settings, the papers' step counts
    python benchmarks/toy/run.py --setting cagrad --steps 2000 --methods Mean MGDA CAGrad

Writes, per setting, ``<out>/<setting>.json`` (the setting, the machine, per method: how it
ran, its wall time, any failure, and per start the end point and losses) and
``<out>/<setting>_trajectories.csv`` (the point every ``--record-every`` steps), then the
figures and tables of ``report.py``. Default ``--out``: ``benchmarks/toy/results``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LIBRARY = HERE.parents[1] / "gradsurgery"
sys.path.insert(1, str(HERE.parent))  # the shared method registry

import gradsurgery as gs  # noqa: E402

import method_registry  # noqa: E402
import report  # noqa: E402
from problem import PARETO_X1, PARETO_X2, toy_losses  # noqa: E402
from trajectories import SETTINGS, MethodRun, batched_eligible, run_batched, run_wrapper  # noqa: E402

# Adapting the methods to a problem without epochs or batches, as the papers that use it do.
TOY_OPTIONS = {
    "FAMO": {"gamma": 0.0},  # FAMO's experiments/toy/run.sh: "a very small gamma" (0.0)
    "DWA": {"window": "step"},  # no epochs: the loss ratios of the last two steps
    "STCH": {"log_transform": False},  # the paper's form (eq. 8): no epoch-long warm-up
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", help="method names (default: every method)")
    parser.add_argument("--steps", type=int, help="override the setting's number of steps")
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="of the points (the authors' toy.py: float32)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other methods of an existing result file (replace these)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="run nothing: fold the results of DIR (other runs) into --out",
    )
    parser.add_argument("--no-figures", action="store_true")
    return parser.parse_args(argv)


def run_setting(
    setting, entries, record_every: int, dtype: torch.dtype, checkpoint=None
) -> dict[str, MethodRun]:
    batched: dict[str, list | None] = {}
    wrapped = []
    for name, entry in entries.items():
        if name == "Mean":
            batched[name] = None  # the mean needs no method object
        elif entry.build_method is not None and batched_eligible(entry.build_method(2)):
            batched[name] = [entry.build_method(2) for _ in setting.starts]
        else:
            wrapped.append(name)
    runs = run_batched(setting, batched, record_every, dtype, checkpoint)
    for name in wrapped:
        runs[name] = run_wrapper(setting, name, entries[name], record_every, dtype)
    return {name: runs[name] for name in entries}


def summarize(setting, runs: dict[str, MethodRun], entries, dtype, machine: dict) -> dict:
    methods = {}
    for name, run in runs.items():
        end = torch.tensor(run.trajectory[-1], dtype=torch.float64)
        losses = toy_losses(end, setting.scale)
        methods[name] = {
            "path": run.path,
            "steps_done": run.recorded_steps[-1],
            "options": entries[name].options,
            "seconds": run.seconds,
            "failure": run.failure,
            "ends": [
                {
                    "start": list(start),
                    "x": point.tolist(),
                    "losses": loss.tolist(),
                    "mean_loss": float(loss.mean()),
                    "distance_to_pareto_set": _distance_to_pareto_set(point),
                }
                for start, point, loss in zip(setting.starts, end, losses, strict=True)
            ],
        }
    return {
        "setting": {
            "name": setting.name, "starts": setting.starts, "steps": setting.steps,
            "scale_of_loss_1": setting.scale, "optimizer": f"Adam(lr={setting.lr})",
            "dtype": str(dtype).removeprefix("torch."), "reference": setting.reference,
        },
        "steps_done": min(run.recorded_steps[-1] for run in runs.values()),
        "pareto_set": {"x2": PARETO_X2, "x1": list(PARETO_X1)},
        "machine": dict(machine),
        "methods": methods,
    }  # fmt: skip


def _distance_to_pareto_set(point: torch.Tensor) -> float:
    x1 = min(max(float(point[0]), PARETO_X1[0]), PARETO_X1[1])
    return ((float(point[0]) - x1) ** 2 + (float(point[1]) - PARETO_X2) ** 2) ** 0.5


RUN_KEYS = ("command", "gradsurgery_commit", "gradsurgery_modified", "date", "load_average",
            "wall_seconds")  # fmt: skip


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""


def _machine() -> dict:
    return {
        "command": shlex.join(["python", "benchmarks/toy/run.py", *sys.argv[1:]]),
        "gradsurgery_commit": _git("rev-parse", "HEAD"),
        # files of the library that differed from that commit when it ran
        "gradsurgery_modified": _git("status", "--porcelain", "--", str(LIBRARY)).split("\n"),
        "gradsurgery": gs.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def merge(out: Path, name: str, summary: dict) -> dict:
    """The earlier result file's other methods, each with the command that ran it, and these."""
    path = out / f"{name}.json"
    if not path.exists():
        return summary
    earlier = json.loads(path.read_text())
    if earlier["setting"] != summary["setting"]:
        raise SystemExit(f"{path} holds another setting: {earlier['setting']}")
    methods = {**earlier["methods"], **summary["methods"]}
    order = method_registry.PREFERRED_ORDER
    ranked = sorted(methods, key=lambda m: order.index(m) if m in order else len(order))
    steps_done = min(result["steps_done"] for result in methods.values())
    return {**summary, "steps_done": steps_done, "methods": {m: methods[m] for m in ranked}}


def combine(out: Path, name: str, other: Path) -> None:
    """Fold the methods of another run's result files into those of ``out``."""
    summary = merge(out, name, json.loads((other / f"{name}.json").read_text()))
    with (other / f"{name}_trajectories.csv").open() as file:
        rows = list(csv.reader(file))[1:]
    replaced = {row[0] for row in rows}
    kept = []
    if (out / f"{name}_trajectories.csv").exists():
        with (out / f"{name}_trajectories.csv").open() as file:
            kept = [row for row in list(csv.reader(file))[1:] if row[0] not in replaced]
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    with (out / f"{name}_trajectories.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "start", "step", "x1", "x2"])
        writer.writerows(kept + rows)


def write_trajectories(path: Path, runs: dict[str, MethodRun], merge: bool = False) -> None:
    kept = []
    if merge and path.exists():
        with path.open() as file:
            kept = [row for row in csv.reader(file)][1:]
        kept = [row for row in kept if row[0] not in runs]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "start", "step", "x1", "x2"])
        writer.writerows(kept)
        for name, run in runs.items():
            for step, points in zip(run.recorded_steps, run.trajectory, strict=True):
                for start, (x1, x2) in enumerate(points):
                    writer.writerow([name, start, step, f"{x1:.6g}", f"{x2:.6g}"])


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    args = parse_args(argv)
    entries = method_registry.select(args.methods, TOY_OPTIONS)
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        for directory in args.combine:
            for name in args.setting:
                if (directory / f"{name}.json").exists():
                    combine(args.out, name, directory)
                    if not args.no_figures:
                        report.write(args.out, name)
        return
    for name in args.setting:
        setting = SETTINGS[name]
        if args.steps is not None:
            setting = type(setting)(**{**setting.__dict__, "steps": args.steps})
        started, machine = time.perf_counter(), _machine()

        def save(runs, setting=setting, name=name, started=started, machine=machine):
            summary = summarize(setting, runs, entries, dtype, machine)
            summary["machine"]["wall_seconds"] = time.perf_counter() - started
            for result in summary["methods"].values():
                result["run"] = {key: summary["machine"][key] for key in RUN_KEYS}
            if args.merge:
                summary = merge(args.out, name, summary)
            (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
            write_trajectories(args.out / f"{name}_trajectories.csv", runs, args.merge)
            return summary

        runs = run_setting(setting, entries, args.record_every, dtype, save)
        save(runs)
        failed = {n: r.failure for n, r in runs.items() if r.failure}
        print(f"{name}: {len(runs)} methods, {time.perf_counter() - started:.0f} s"
              + (f"; failures: {failed}" if failed else ""))  # fmt: skip
        if not args.no_figures:
            report.write(args.out, name)


if __name__ == "__main__":
    main()
