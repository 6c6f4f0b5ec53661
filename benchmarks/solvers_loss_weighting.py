"""How long a loss weighting's own work takes per step, alone, at T = 3, 10 and 50 tasks.

A loss weighting adds its ``decide()`` (the weights from ``T`` loss values, and its state) and
``commit()`` to a plain summed-loss step. This times exactly that, on Python floats, with the
thread's CPU clock (``time.thread_time``: time the process spends descheduled by other load is
not charged), the median of repeated blocks of calls.

    python benchmarks/solvers_loss_weighting.py   # writes results/solvers_loss_weighting.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import torch

from gradsurgery._weighting import Method, TaskStats
from gradsurgery.methods.dbmtl import DBMTL
from gradsurgery.methods.dwa import DWA
from gradsurgery.methods.famo import FAMO
from gradsurgery.methods.gls import GLS
from gradsurgery.methods.imtl_l import IMTLL
from gradsurgery.methods.linear_scalarization import LinearScalarization
from gradsurgery.methods.rlw import RLW
from gradsurgery.methods.stch import STCH
from gradsurgery.methods.uw import UW

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (3, 10, 50)


def _stch_after_warm_up(num_tasks: int) -> STCH:
    method = STCH(warmup_epochs=0)
    method.commit(method.decide(TaskStats(losses=(1.0,) * num_tasks)).state)
    method.end_epoch()  # the normalizer is fixed: every later step is the smooth maximum
    return method


# (name, factory(T)): each method in the state it spends most of training in.
LOSS_WEIGHTINGS: list[tuple[str, Callable[[int], Method]]] = [
    ("LinearScalarization", lambda T: LinearScalarization([1.0] * T)),
    ("UW", lambda T: UW(T)),
    ("IMTLL", lambda T: IMTLL(T)),
    ("DWA (step windows)", lambda T: DWA(window="step")),
    ("RLW", lambda T: RLW(generator=torch.Generator().manual_seed(0))),
    ("GLS", lambda T: GLS()),
    ("FAMO (next losses)", lambda T: FAMO(T)),
    ("DBMTL", lambda T: DBMTL()),
    ("STCH", _stch_after_warm_up),
]


def time_step(method: Method, num_tasks: int, number: int, repeat: int) -> dict[str, float]:
    """Microseconds per ``decide()`` + ``commit()``, on losses that change every call."""
    g = torch.Generator().manual_seed(num_tasks)
    rows = [tuple((torch.rand(num_tasks, generator=g) + 0.5).tolist()) for _ in range(64)]
    stats = [TaskStats(losses=row, squared_norms=row) for row in rows]
    calls = iter(range(10**12))

    def one_step() -> None:
        decision = method.decide(stats[next(calls) % 64])
        method.commit(decision.state)

    for _ in range(200):  # warm up, and leave every warm-up window behind
        one_step()
    timer = timeit.Timer(one_step, timer=time.thread_time)
    blocks = [t / number * 1e6 for t in timer.repeat(number=number, repeat=repeat)]
    return {"median_us": statistics.median(blocks), "min_us": min(blocks)}


def _commit() -> str:
    command = ["git", "rev-parse", "--short", "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=500, help="calls per timed block")
    parser.add_argument("--repeat", type=int, default=15, help="timed blocks per case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, build in LOSS_WEIGHTINGS:
        for num_tasks in TASKS:
            timing = time_step(build(num_tasks), num_tasks, args.number, args.repeat)
            rows.append({"method": name, "tasks": num_tasks, **timing})
            print(f"{name:22s} T={num_tasks:3d} {timing['median_us']:8.1f} us")
    result = {
        "what": "decide() + commit() of each loss weighting, per step, microseconds",
        "clock": "time.thread_time",
        "number": args.number,
        "repeat": args.repeat,
        "commit": _commit(),
        "load_average_1min": os.getloadavg()[0],  # other processes share the cores
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "solvers_loss_weighting.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| method | " + " | ".join(f"T = {t}" for t in TASKS) + " |",
        "|---|" + "---:|" * len(TASKS),
    ]
    for name, _ in LOSS_WEIGHTINGS:
        cells = [f"{r['median_us']:.1f} us" for r in rows if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "solvers_loss_weighting.md").write_text(
        "Median CPU time of `decide()` + `commit()` per step (`python "
        f"benchmarks/solvers_loss_weighting.py` at {result['commit']}, 1-minute load average "
        f"{result['load_average_1min']:.1f} on {os.cpu_count()} CPUs).\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
