"""MultiMNIST with every method of gradsurgery, single-task baselines and tuned fixed weights.

    python benchmarks/multimnist/run.py                      # everything: 5 seeds, every method
    python benchmarks/multimnist/run.py --seeds 0 --methods Mean PCGrad   # a part of it
    python benchmarks/multimnist/run.py --summary-only       # tables and figure from the runs
    python benchmarks/multimnist/run.py --representation MGDA PCGrad   # also in representation mode

Each (method, seed) is one process (``train.py``) whose JSON line is kept in
``<out>/per_run/<method>_seed<k>.json``; a run whose file exists is not run again, so an
interrupted benchmark resumes where it stopped. Then ``summary.py`` writes the table
(``summary.csv``, ``summary.md``) and the figure (``accuracy_vs_time.png``).

The fixed weights ``(w, 1 - w)`` are tuned first: every ``w`` of ``--fixed-grid`` is trained
with the first seed, and the best mean *validation* accuracy (a held-out part of the training
pairs, never the test set) picks the ``w`` that then runs with every seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent))

from timing import git_commit  # noqa: E402

import gradsurgery  # noqa: E402

import method_registry  # noqa: E402
import summary  # noqa: E402
from train import EPOCHS  # noqa: E402

FIXED_GRID = (0.2, 0.35, 0.5, 0.65, 0.8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", help="registry names (default: every method)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the single-task and fixed-weight runs")  # fmt: skip
    parser.add_argument("--fixed-grid", type=float, nargs="+", default=list(FIXED_GRID))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--train-size", type=int, default=9_000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument(
        "--representation",
        nargs="+",
        default=[],
        metavar="METHOD",
        help="methods to run again in representation mode (rows '<method>-rep')",
    )
    return parser.parse_args(argv)


def _label(method: str, extra: list[str]) -> str:
    if method == "SingleTask":
        return f"SingleTask{int(extra[extra.index('--task') + 1]) + 1}"
    if method == "Fixed":
        w = extra[extra.index("--weights") + 1]
        return f"Fixed{float(w):g}"
    return method + ("-rep" if "--representation" in extra else "")


def run_one(args: argparse.Namespace, method: str, seed: int, extra: list[str]) -> dict | None:
    path = args.out / "per_run" / f"{_label(method, extra)}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    command = [
        sys.executable, str(HERE / "train.py"), "--method", method, "--seed", str(seed),
        "--epochs", str(args.epochs), "--train-size", str(args.train_size), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {method} seed {seed}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_seconds"] = time.perf_counter() - started
    result["command"] = " ".join(["python", "benchmarks/multimnist/train.py", *command[2:]])
    result["gradsurgery_commit"] = git_commit(Path(gradsurgery.__file__).parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['method']} seed {seed}: test accuracy {result['test_accuracy']}, "
          f"{result['process_wall_seconds']:.0f} s", flush=True)  # fmt: skip
    return result


def run_all(args: argparse.Namespace, jobs: list[tuple[str, int, list[str]]]) -> list[dict]:
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = pool.map(lambda job: run_one(args, *job), jobs)
        return [result for result in results if result is not None]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        methods = list(method_registry.select(args.methods))
        jobs = []
        if not args.no_baselines:
            jobs += [("SingleTask", s, ["--task", str(t)]) for s in args.seeds for t in (0, 1)]
            tuning = [("Fixed", args.seeds[0], ["--weights", str(w), str(1 - w)])
                      for w in args.fixed_grid]  # fmt: skip
            best = max(run_all(args, tuning),
                       key=lambda r: sum(r["validation_accuracy"]))  # fmt: skip
            w = best["options"]["weights"][0]
            jobs += [("Fixed", s, ["--weights", str(w), str(1 - w)]) for s in args.seeds]
        jobs += [(method, s, []) for s in args.seeds for method in methods]
        represented = (
            list(method_registry.select(args.representation)) if args.representation else []
        )
        jobs += [(method, s, ["--representation"]) for s in args.seeds for method in represented]
        run_all(args, jobs)
    summary.write(args.out)


if __name__ == "__main__":
    main()
