"""The part of each method's step that is its own, alone, at T = 3, 10 and 50 tasks.

A method's step pays for the per-task gradients (or none, for a loss weighting), then for its
own work: the weights from the ``[T, T]`` Gramian (a QP, an eigendecomposition, Newton
iterations), or from the ``T`` loss values, and its state. This times that work alone so that it
can be compared with the rest of the step:

- ``functional``: ``gradsurgery.functional.<method>_weights(G)`` on a float64 Gramian;
- ``method``: a ``gradsurgery.methods`` class's ``decide()`` + ``commit()`` on the
  :class:`~gradsurgery._weighting.TaskStats` it reads (Gramian, loss values, or for GradDrop
  the ``[T, P]`` per-task gradients);
- ``torchjd``: torchjd 0.18's weighting or aggregator of the same method on the same inputs
  (its default solvers; skipped when torchjd is not installed, or with ``--no-torchjd``).

Inputs change at every call: Gramians of random Jacobians ``[T, 1000]`` with row scales spread
over two decades, positive loss values, Jacobians ``[T, 100000]`` for GradDrop; one input set
per T, the same for every case. Timing: ``time.thread_time`` per call (the CPU time of this
thread, so another process's load is not charged), one torch and BLAS thread, the cases
interleaved round-robin in blocks; the median and the 90th percentile over all calls.

    python benchmarks/solvers.py                 # writes results/solvers.json and solvers.md
    python benchmarks/solvers.py --quick         # a smoke run, printed only

Add a case: append a :class:`Case` to :data:`CASES`.
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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gradsurgery import functional as F
from gradsurgery._jacobian import TaskJacobian
from gradsurgery._weighting import Method, TaskStats
from gradsurgery.methods import (
    aligned_mtl,
    cagrad,
    config,
    dbmtl,
    dualproj,
    dwa,
    fairgrad,
    famo,
    gls,
    graddrop,
    gradvac,
    imtl_l,
    imtlg,
    linear_scalarization,
    mgda,
    nash_mtl,
    rlw,
    stch,
    upgrad,
    uw,
)

RESULTS = Path(__file__).resolve().parent / "results"
TASK_COUNTS = (3, 10, 50)
GRADDROP_PARAMS = 100_000  # GradDrop works on coordinates: its cost is O(T P)
INPUTS_PER_T = 16


@dataclass(frozen=True)
class Inputs:
    """One T's inputs, shared by every case: what each kind of solver reads."""

    jacobians: list[Tensor]  # [T, 1000] float64
    gramians: list[Tensor]  # J J^T
    losses: list[tuple[float, ...]]
    wide_jacobian: Tensor  # [T, GRADDROP_PARAMS] float32, for GradDrop


def make_inputs(num_tasks: int) -> Inputs:
    g = torch.Generator().manual_seed(num_tasks)
    jacobians = []
    for _ in range(INPUTS_PER_T):
        J = torch.randn(num_tasks, 1000, dtype=torch.float64, generator=g)
        J *= 10.0 ** (2 * torch.rand(num_tasks, 1, dtype=torch.float64, generator=g) - 1)
        jacobians.append(J)
    losses = [tuple((torch.rand(num_tasks, generator=g) + 0.5).tolist()) for _ in jacobians]
    wide = torch.randn(num_tasks, GRADDROP_PARAMS, generator=g)
    return Inputs(jacobians, [J @ J.T for J in jacobians], losses, wide)


Call = Callable[[int], object]  # the call on input number i


@dataclass(frozen=True)
class Case:
    """A timed solver: its row name, its kind, and what builds its call for T tasks."""

    name: str
    kind: str  # "functional", "method" or "torchjd"
    build: Callable[[int, Inputs], Call]


def functional(name: str, solve: Callable[[Tensor], Tensor]) -> Case:
    def build(num_tasks: int, inputs: Inputs) -> Call:
        return lambda i: solve(inputs.gramians[i % INPUTS_PER_T])

    return Case(name, "functional", build)


def method(name: str, make: Callable[[int], Method], reads: str = "gramian") -> Case:
    """``decide()`` + ``commit()``; ``reads`` is "gramian", "losses" or "jacobian"."""

    def build(num_tasks: int, inputs: Inputs) -> Call:
        instance = make(num_tasks)
        if reads == "jacobian":
            jacobian = TaskJacobian(inputs.wide_jacobian, None, [GRADDROP_PARAMS])
            stats = [TaskStats(losses=(1.0,) * num_tasks, jacobian=jacobian)]
        elif reads == "losses":  # squared_norms too, for DB-MTL
            stats = [TaskStats(losses=row, squared_norms=row) for row in inputs.losses]
        else:
            stats = [
                TaskStats(losses=(1.0,) * num_tasks, gramian_rows=G.tolist())
                for G in inputs.gramians
            ]

        def call(i: int) -> None:
            instance.commit(instance.decide(stats[i % len(stats)]).state)

        for i in range(200 if reads == "losses" else 3):  # past every warm-up window
            call(i)
        return call

    return Case(name, "method", build)


def _stch_after_warm_up(num_tasks: int) -> stch.STCH:
    method = stch.STCH(warmup_epochs=0)
    method.commit(method.decide(TaskStats(losses=(1.0,) * num_tasks)).state)
    method.end_epoch()  # the normalizer is fixed: every later step is the smooth maximum
    return method


CASES: list[Case] = [
    # The Gramian methods' solvers, as functions.
    functional("mgda", F.mgda_weights),
    functional("mgda-l2", lambda G: F.mgda_weights(G, normalization="l2")),
    functional("upgrad", F.upgrad_weights),
    functional("dualproj", F.dualproj_weights),
    functional("imtlg", F.imtlg_weights),
    functional("cagrad", F.cagrad_weights),
    functional("aligned-mtl", F.aligned_mtl_weights),
    functional("nash-mtl", F.nash_mtl_weights),
    # Gradient methods whose work is in their decide() (default hyper-parameters): the
    # Gramian methods above as a step runs them, then the methods without a functional row.
    method("MGDA", lambda T: mgda.MGDA()),
    method("UPGrad", lambda T: upgrad.UPGrad()),
    method("DualProj", lambda T: dualproj.DualProj()),
    method("IMTLG", lambda T: imtlg.IMTLG()),
    method("CAGrad", lambda T: cagrad.CAGrad()),
    method("AlignedMTL", lambda T: aligned_mtl.AlignedMTL()),
    method("NashMTL (previous weights)", lambda T: nash_mtl.NashMTL()),
    method("FairGrad", lambda T: fairgrad.FairGrad()),
    method("FairGrad (alpha=2)", lambda T: fairgrad.FairGrad(alpha=2.0)),
    method("ConFIG", lambda T: config.ConFIG()),
    method("GradVac", lambda T: gradvac.GradVac(generator=torch.Generator().manual_seed(0))),
    method(
        f"GradDrop (P = {GRADDROP_PARAMS})",
        lambda T: graddrop.GradDrop(generator=torch.Generator()),
        reads="jacobian",
    ),
    # Loss weightings, each in the state it spends most of training in.
    method(
        "LinearScalarization",
        lambda T: linear_scalarization.LinearScalarization([1.0] * T),
        reads="losses",
    ),
    method("UW", lambda T: uw.UW(T), reads="losses"),
    method("IMTLL", lambda T: imtl_l.IMTLL(T), reads="losses"),
    method("DWA (step windows)", lambda T: dwa.DWA(window="step"), reads="losses"),
    method("RLW", lambda T: rlw.RLW(generator=torch.Generator().manual_seed(0)), reads="losses"),
    method("GLS", lambda T: gls.GLS(), reads="losses"),
    method("FAMO (next losses)", lambda T: famo.FAMO(T), reads="losses"),
    method("DBMTL", lambda T: dbmtl.DBMTL(), reads="losses"),
    method("STCH", _stch_after_warm_up, reads="losses"),
]


def torchjd_cases() -> list[Case]:
    """torchjd 0.18's implementations of the same methods (empty without torchjd).

    Weightings read the Gramian; ConFIG and GradDrop are aggregators of the Jacobian (ConFIG
    reads it whole, where gradsurgery's reads the Gramian). Nash-MTL's works on the Jacobian
    with cvxpy and is left out.
    """
    try:
        from torchjd import aggregation as a
    except ImportError:
        return []

    def on_gramian(name: str, weighting: object) -> Case:
        def build(num_tasks: int, inputs: Inputs) -> Call:
            return lambda i: weighting(inputs.gramians[i % INPUTS_PER_T])

        return Case(f"torchjd-{name}", "torchjd", build)

    def on_jacobian(name: str, aggregator: object, wide: bool = False) -> Case:
        def build(num_tasks: int, inputs: Inputs) -> Call:
            if wide:
                return lambda i: aggregator(inputs.wide_jacobian)
            return lambda i: aggregator(inputs.jacobians[i % INPUTS_PER_T])

        return Case(f"torchjd-{name}", "torchjd", build)

    return [
        on_gramian("mgda", a.MGDAWeighting()),
        on_gramian("upgrad", a.UPGradWeighting()),
        on_gramian("dualproj", a.DualProjWeighting()),
        on_gramian("imtlg", a.IMTLGWeighting()),
        on_gramian("cagrad", a.CAGradWeighting(c=0.4)),
        on_gramian("aligned-mtl", a.AlignedMTLWeighting()),
        on_gramian("FairGrad", a.FairGradWeighting(1.0)),
        on_gramian("GradVac", a.GradVacWeighting()),
        on_jacobian("ConFIG", a.ConFIG()),
        on_jacobian(f"GradDrop (P = {GRADDROP_PARAMS})", a.GradDrop(), wide=True),
    ]


def time_cases(cases: list[Case], task_counts: tuple[int, ...], calls: int, block: int):
    """Every case at every T, interleaved round-robin in blocks of ``block`` calls."""
    rows = []
    for num_tasks in task_counts:
        inputs = make_inputs(num_tasks)
        built = [(case, case.build(num_tasks, inputs)) for case in cases]
        for _, call in built:  # warm-up: imports, caches, first-call allocations
            call(0)
        samples: dict[str, list[float]] = {case.name: [] for case in cases}
        index = 0
        for round_index in range(max(1, calls // block)):
            shift = round_index % len(built)
            for case, call in built[shift:] + built[:shift]:
                for _ in range(block):
                    index += 1
                    start = time.thread_time()
                    call(index)
                    samples[case.name].append(time.thread_time() - start)
        for case in cases:
            values = sorted(samples[case.name])
            rows.append(
                {
                    "solver": case.name,
                    "kind": case.kind,
                    "num_tasks": num_tasks,
                    "calls": len(values),
                    "median_us": 1e6 * statistics.median(values),
                    "p90_us": 1e6 * values[int(0.9 * (len(values) - 1))],
                }
            )
        print(f"T = {num_tasks}: {len(cases)} cases timed", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], task_counts: tuple[int, ...]) -> str:
    header = "| solver | kind | " + " | ".join(f"T = {t} (median / p90, µs)" for t in task_counts)
    lines = [header + " |", "|---|---|" + "---:|" * len(task_counts)]
    for name in dict.fromkeys(row["solver"] for row in rows):
        mine = {r["num_tasks"]: r for r in rows if r["solver"] == name}
        cells = [f"{mine[t]['median_us']:.0f} / {mine[t]['p90_us']:.0f}" for t in task_counts]
        kind = next(iter(mine.values()))["kind"]
        lines.append(f"| `{name}` | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    command = ["git", "rev-parse", "--short", "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls, print only")
    parser.add_argument("--calls", type=int, default=200, help="calls per case and T")
    parser.add_argument("--no-torchjd", dest="torchjd", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls, block = (10, 5) if args.quick else (args.calls, 10)
    started, load_start = time.time(), os.getloadavg()
    cases = CASES + (torchjd_cases() if args.torchjd else [])
    rows = time_cases(cases, TASK_COUNTS, calls, block)
    table = markdown(rows, TASK_COUNTS)
    print(table)
    if args.quick:
        return
    command = "python " + " ".join(["benchmarks/solvers.py", *sys.argv[1:]])
    report = {
        "suite": "solvers",
        "command": command,
        "commit": _commit(),
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "solvers.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "solvers.md").write_text(
        "# Each method's own work, alone\n\n"
        f"`{command}` at {report['commit']} on {report['machine']['processor']} "
        f"({report['machine']['cpus']} CPUs, load {load_start[0]:.1f}): per call, the "
        "functional solver on a float64 Gramian, a method's `decide()` + `commit()`, or "
        "torchjd's implementation on the same inputs.\n\n" + table
    )


if __name__ == "__main__":
    main()
