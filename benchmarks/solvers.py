"""The solver part of each Gramian method alone: ``<method>_weights(G)`` on a ``[T, T]``
Gramian, at T = 3, 10 and 50.

A method's step also pays for its per-task gradients and the Gramian; this isolates the small
problem each method solves (a QP, an eigendecomposition, Newton iterations) so that it can be
compared with the rest of the step. The Gramians come from random Jacobians ``[T, 1000]`` with
row scales spread over two decades, one per (T, seed), the same for every solver.

Timing: ``time.thread_time`` per call (the CPU time of this thread, so another process's load
is not charged), ``torch.set_num_threads(1)``, solvers interleaved round-robin in blocks, the
median and the 90th percentile over all calls.

    python benchmarks/solvers.py                 # writes results/solvers.json and solvers.md
    python benchmarks/solvers.py --quick         # a smoke run, printed only

Add a solver: append ``(name, function(G) -> weights)`` to ``SOLVERS``. torchjd's weightings of
the same methods (its default solvers: Frank-Wolfe, quadprog, Clarabel through cvxpy) are
timed too when it is installed; Nash-MTL's works on the Jacobian, not the Gramian, and is left
out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gradsurgery import functional as F

RESULTS = Path(__file__).parent / "results"

Solver = Callable[[Tensor], Tensor]

# One line per solver; the functions receive a float64 [T, T] Gramian.
SOLVERS: list[tuple[str, Solver]] = [
    ("mgda", F.mgda_weights),
    ("mgda-l2", lambda G: F.mgda_weights(G, normalization="l2")),
    ("upgrad", F.upgrad_weights),
    ("dualproj", F.dualproj_weights),
    ("imtlg", F.imtlg_weights),
    ("cagrad", F.cagrad_weights),
    ("aligned-mtl", F.aligned_mtl_weights),
    ("nash-mtl", F.nash_mtl_weights),
]

TASK_COUNTS = (3, 10, 50)


def torchjd_solvers() -> list[tuple[str, Solver]]:
    """torchjd 0.18's weightings of the same methods, for comparison (skipped without it)."""
    try:
        from torchjd.aggregation import (
            AlignedMTLWeighting,
            CAGradWeighting,
            DualProjWeighting,
            IMTLGWeighting,
            MGDAWeighting,
            UPGradWeighting,
        )
    except ImportError:
        return []
    return [
        ("torchjd-mgda", MGDAWeighting()),
        ("torchjd-upgrad", UPGradWeighting()),
        ("torchjd-dualproj", DualProjWeighting()),
        ("torchjd-imtlg", IMTLGWeighting()),
        ("torchjd-cagrad", CAGradWeighting(c=0.4)),
        ("torchjd-aligned-mtl", AlignedMTLWeighting()),
    ]


def gramians(num_tasks: int, count: int, num_params: int = 1000) -> list[Tensor]:
    generator = torch.Generator().manual_seed(num_tasks)
    result = []
    for _ in range(count):
        J = torch.randn(num_tasks, num_params, dtype=torch.float64, generator=generator)
        J *= 10.0 ** (2 * torch.rand(num_tasks, 1, dtype=torch.float64, generator=generator) - 1)
        result.append(J @ J.T)
    return result


def time_solvers(
    solvers: list[tuple[str, Solver]], task_counts: tuple[int, ...], calls: int, block: int
) -> list[dict]:
    rows = []
    for num_tasks in task_counts:
        inputs = gramians(num_tasks, block)
        samples: dict[str, list[float]] = {name: [] for name, _ in solvers}
        for _, solve in solvers:  # warm-up: imports, caches, first-call allocations
            solve(inputs[0])
        rounds = max(1, calls // block)
        for round_index in range(rounds):
            shift = round_index % len(solvers)
            for name, solve in solvers[shift:] + solvers[:shift]:
                for G in inputs:
                    start = time.thread_time()
                    solve(G)
                    samples[name].append(time.thread_time() - start)
        for name, _ in solvers:
            values = sorted(samples[name])
            rows.append(
                {
                    "solver": name,
                    "num_tasks": num_tasks,
                    "calls": len(values),
                    "median_us": 1e6 * statistics.median(values),
                    "p90_us": 1e6 * values[int(0.9 * (len(values) - 1))],
                }
            )
    return rows


def markdown(rows: list[dict], task_counts: tuple[int, ...]) -> str:
    header = "| solver | " + " | ".join(f"T = {t} (median / p90, µs)" for t in task_counts) + " |"
    lines = [header, "|---|" + "---|" * len(task_counts)]
    for name in dict.fromkeys(row["solver"] for row in rows):
        cells = []
        for t in task_counts:
            row = next(r for r in rows if r["solver"] == name and r["num_tasks"] == t)
            cells.append(f"{row['median_us']:.0f} / {row['p90_us']:.0f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls, print only")
    parser.add_argument("--calls", type=int, default=200, help="calls per solver and T")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls, block = (20, 5) if args.quick else (args.calls, 10)
    started = time.time()
    load_start = os.getloadavg()
    rows = time_solvers(SOLVERS + torchjd_solvers(), TASK_COUNTS, calls, block)
    table = markdown(rows, TASK_COUNTS)
    print(table)
    if args.quick:
        return
    report = {
        "suite": "solvers",
        "command": "python benchmarks/solvers.py"
        + (f" --calls {args.calls}" if args.calls != 200 else ""),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "duration_s": time.time() - started,
        "settings": {"timer": "time.thread_time", "threads": 1, "block": block},
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "solvers.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "solvers.md").write_text(
        "# Solver part alone\n\n"
        f"`{report['command']}` on {report['machine']['processor']} "
        f"({report['machine']['cpus']} CPUs, load {load_start[0]:.1f}), "
        "per call of `gradsurgery.functional.<method>_weights` on a float64 Gramian.\n\n" + table
    )


if __name__ == "__main__":
    main()
