"""Run gradsurgery's benchmarks and write their results (JSON + markdown).

    python benchmarks/run.py                      # every suite, full size (~15-25 min)
    python benchmarks/run.py --quick              # smoke run of every suite (~1 min)
    python benchmarks/run.py --suite study        # one suite (study, scaling, training)
    python benchmarks/run.py --suite scaling --models 1M --tasks 10 50
    python benchmarks/run.py --device cuda --suite study scaling   # on a GPU

Results go to ``benchmarks/results/<suite>.json`` (``benchmarks/results/quick/`` with
``--quick``, ``benchmarks/results/cuda/`` with ``--device cuda``), and ``README.md`` next to
them is regenerated from every suite JSON there.
See ``benchmarks/README.md`` for what is measured and what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import scaling  # noqa: E402
import study  # noqa: E402
import training  # noqa: E402
from timing import machine  # noqa: E402

SUITES = ("study", "scaling", "training")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--quick", action="store_true", help="few steps, small sizes: a smoke run")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: benchmarks/results)"
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="scaling: task counts")
    parser.add_argument(
        "--models", nargs="+", choices=list(scaling.MODELS), default=None, help="scaling: models"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="scaling: skip the peak-memory probes"
    )
    parser.add_argument(
        "--device",
        type=torch.device,
        default=torch.device("cpu"),
        help="cpu (default) or cuda; the training suite runs on the CPU only",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the study's setting; also keeps both cores' load comparable
    device_folder = "" if args.device.type == "cpu" else args.device.type
    out = args.out or (HERE / "results" / device_folder / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])])
    for suite in args.suite:
        if suite == "training" and args.device.type != "cpu":
            print("training: the study's training loop runs on the CPU only, suite skipped")
            continue
        if suite == "training" and not training.example_available():
            print("training: examples/lunarlander_mtl/train.py not found, suite skipped")
            continue
        payload = _run_suite(suite, args, command)
        path = out / f"{suite}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"wrote {report.write_markdown(out)}")


def _run_suite(suite: str, args: argparse.Namespace, command: str) -> dict:
    """Run one suite, wrapped with what is needed to read its numbers later."""
    described = machine(args.device)  # before the run: its date is the start
    load_start, start = os.getloadavg(), time.perf_counter()
    if suite == "study":
        body = study.run(args.quick, device=args.device)
    elif suite == "scaling":
        tasks = tuple(args.tasks or (scaling.QUICK_TASKS if args.quick else scaling.TASKS))
        models = tuple(args.models or (scaling.QUICK_MODELS if args.quick else scaling.MODELS))
        body = scaling.run(
            args.quick, tasks=tasks, models=models, memory=not args.no_memory, device=args.device
        )
    else:
        body = training.run(args.quick)
    return {
        "suite": suite,
        "command": command,
        "quick": args.quick,
        "machine": described,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "duration_s": time.perf_counter() - start,
        **body,
    }


if __name__ == "__main__":
    main()
