"""How long FairGrad's, ConFIG's, GradVac's and GradDrop's own work takes per step, alone.

A gradient method adds its ``decide()`` (the weights from the ``T x T`` Gramian, or for
GradDrop the update from the ``[T, P]`` per-task gradients) and ``commit()`` to the per-task
gradients' cost. This times exactly that at T = 3, 10 and 50 tasks, with the thread's CPU clock
(``time.thread_time``: time the process spends descheduled by other load is not charged), the
median of repeated blocks of calls, on Gramians of random Jacobians that change every call.

    python benchmarks/solvers_gradient_methods.py   # writes results/solvers_gradient_methods.*

torchjd 0.18's implementations are timed on the same inputs for reference (``--no-torchjd``
skips them): FairGrad's and GradVac's weightings on the Gramian, ConFIG and GradDrop on the
Jacobian (ConFIG reads it whole; gradsurgery's reads the Gramian).
"""

from __future__ import annotations

import os

# One BLAS thread, as torch.set_num_threads(1): NumPy's small solves are timed, not contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import torch

from gradsurgery._jacobian import TaskJacobian
from gradsurgery._weighting import Method, TaskStats
from gradsurgery.methods.config import ConFIG
from gradsurgery.methods.fairgrad import FairGrad
from gradsurgery.methods.graddrop import GradDrop
from gradsurgery.methods.gradvac import GradVac

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = (3, 10, 50)
GRADDROP_PARAMS = 100_000  # GradDrop works on coordinates: its cost is O(T P)

# (name, factory(T)): each method with its default hyper-parameters.
GRADIENT_METHODS: list[tuple[str, Callable[[int], Method]]] = [
    ("FairGrad", lambda T: FairGrad()),
    ("FairGrad (alpha=2)", lambda T: FairGrad(alpha=2.0)),
    ("ConFIG", lambda T: ConFIG()),
    ("GradVac", lambda T: GradVac(generator=torch.Generator().manual_seed(0))),
    (f"GradDrop (P = {GRADDROP_PARAMS})", lambda T: GradDrop(generator=torch.Generator())),
]


def _stats(method: Method, num_tasks: int) -> list[TaskStats]:
    """64 steps' inputs: Gramians of random Jacobians (more parameters than tasks, so every
    method is defined), or the Jacobians themselves for GradDrop."""
    g = torch.Generator().manual_seed(num_tasks)
    if isinstance(method, GradDrop):
        grads = torch.randn(num_tasks, GRADDROP_PARAMS, generator=g)
        return [
            TaskStats(
                losses=(1.0,) * num_tasks, jacobian=TaskJacobian(grads, None, [GRADDROP_PARAMS])
            )
        ]
    result = []
    for _ in range(64):
        J = torch.randn(num_tasks, 4 * num_tasks, dtype=torch.float64, generator=g)
        result.append(TaskStats(losses=(1.0,) * num_tasks, gramian_rows=(J @ J.T).tolist()))
    return result


def time_step(method: Method, num_tasks: int, number: int, repeat: int) -> dict[str, float]:
    """Microseconds per ``decide()`` + ``commit()``."""
    stats = _stats(method, num_tasks)
    calls = iter(range(10**12))

    def one_step() -> None:
        decision = method.decide(stats[next(calls) % len(stats)])
        method.commit(decision.state)

    for _ in range(20):
        one_step()
    timer = timeit.Timer(one_step, timer=time.thread_time)
    blocks = [t / number * 1e6 for t in timer.repeat(number=number, repeat=repeat)]
    return {"median_us": statistics.median(blocks), "min_us": min(blocks)}


def time_torchjd(name: str, num_tasks: int, number: int, repeat: int) -> dict[str, float]:
    """The same step with torchjd 0.18's implementation, on the same inputs (float64)."""
    from torchjd.aggregation import ConFIG as TorchjdConFIG
    from torchjd.aggregation import GradDrop as TorchjdGradDrop
    from torchjd.aggregation._fairgrad import FairGradWeighting
    from torchjd.aggregation._gradvac import GradVacWeighting

    g = torch.Generator().manual_seed(num_tasks)
    if name == "GradDrop":
        inputs = [torch.randn(num_tasks, GRADDROP_PARAMS, generator=g)]
        step = TorchjdGradDrop()
    else:
        jacobians = [
            torch.randn(num_tasks, 4 * num_tasks, dtype=torch.float64, generator=g)
            for _ in range(64)
        ]
        if name == "ConFIG":  # torchjd's ConFIG reads the Jacobian itself
            inputs, step = jacobians, TorchjdConFIG()
        else:
            inputs = [J @ J.T for J in jacobians]
            step = FairGradWeighting(1.0) if name == "FairGrad" else GradVacWeighting()
    calls = iter(range(10**12))

    def one_step() -> None:
        step(inputs[next(calls) % len(inputs)])

    for _ in range(5):
        one_step()
    timer = timeit.Timer(one_step, timer=time.thread_time)
    blocks = [t / number * 1e6 for t in timer.repeat(number=number, repeat=repeat)]
    return {"median_us": statistics.median(blocks), "min_us": min(blocks)}


TORCHJD = ("FairGrad", "ConFIG", "GradVac", "GradDrop")


def _commit() -> str:
    command = ["git", "rev-parse", "--short", "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50, help="calls per timed block")
    parser.add_argument("--repeat", type=int, default=9, help="timed blocks per case")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-torchjd", dest="torchjd", action="store_false", help="skip torchjd's timings"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, build in GRADIENT_METHODS:
        for num_tasks in TASKS:
            number = args.number if num_tasks < 50 else max(1, args.number // 10)
            timing = time_step(build(num_tasks), num_tasks, number, args.repeat)
            rows.append({"method": name, "tasks": num_tasks, "number": number, **timing})
            print(f"{name:28s} T={num_tasks:3d} {timing['median_us']:10.1f} us", flush=True)
    if args.torchjd:
        for name in TORCHJD:
            for num_tasks in TASKS:
                number = args.number if num_tasks < 50 else max(1, args.number // 10)
                timing = time_torchjd(name, num_tasks, number, args.repeat)
                label = f"torchjd {name}" + (
                    f" (P = {GRADDROP_PARAMS})" if name == "GradDrop" else ""
                )
                rows.append({"method": label, "tasks": num_tasks, "number": number, **timing})
                print(f"{label:28s} T={num_tasks:3d} {timing['median_us']:10.1f} us", flush=True)
    result = {
        "what": "decide() + commit() of each gradient method, per step, microseconds",
        "clock": "time.thread_time",
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
    (args.out / "solvers_gradient_methods.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| method | " + " | ".join(f"T = {t}" for t in TASKS) + " |",
        "|---|" + "---:|" * len(TASKS),
    ]
    for name in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{r['median_us']:.1f} us" for r in rows if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "solvers_gradient_methods.md").write_text(
        "Median CPU time of `decide()` + `commit()` per step (`python "
        f"benchmarks/solvers_gradient_methods.py` at {result['commit']}, 1-minute load average "
        f"{result['load_average_1min']:.1f} on {os.cpu_count()} CPUs).\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
