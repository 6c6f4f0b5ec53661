"""Per-task heads on the batch-partition engine: the single backward against per-task autograd.

Interleaved in one process with the multi-input CNN benchmark's step and timing code: the
plain step, PCGrad and UPGrad with the batch-partition engine as it is (``*-fast``), and the
same with the heads sent to per-task autograd (``*-fast-per-task-heads``, the engine's
behaviour before a parameter one task alone reaches took the single backward), as JSON on
stdout.

    python benchmarks/results/per_task_heads/ab.py ROUNDS TASKS [TASKS ...]
"""

import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
torch.set_num_threads(1)

from multi_input_cnn import build_step, make_batches, make_model  # noqa: E402

import gradsurgery._partition.engine as engine_module  # noqa: E402

from timing import clock_for, machine, summarize, time_interleaved  # noqa: E402

SOLE_TASKS = engine_module.sole_tasks
MODES = ["plain", "gs-pcgrad-fast", "gs-upgrad-fast"]


def with_sole_tasks(step, sole_tasks):
    """``step`` with the engine's search for parameters one task alone reaches set."""

    def run():
        engine_module.sole_tasks = sole_tasks
        try:
            step()
        finally:
            engine_module.sole_tasks = SOLE_TASKS

    return run


def per_task_heads(losses, params, columns):
    return {}  # every slow-path parameter differentiated per task, as before


device = torch.device("cpu")
rounds, tasks = int(sys.argv[1]), [int(t) for t in sys.argv[2:]]
out = {"command": "python " + " ".join(sys.argv), "machine": machine(device), "results": []}
for num_tasks in tasks:
    batches = make_batches(num_tasks, 4, device)
    steps = {}
    for mode in MODES:
        step, _ = build_step(mode, make_model(num_tasks, "per-task", device), batches)
        steps[mode] = with_sole_tasks(step, SOLE_TASKS)
        if mode != "plain":
            step, _ = build_step(mode, make_model(num_tasks, "per-task", device), batches)
            steps[mode + "-per-task-heads"] = with_sole_tasks(step, per_task_heads)
    samples = time_interleaved(steps, warmup=2, rounds=rounds, block=2, clock=clock_for(device))
    row = {"tasks": num_tasks, "heads": "per-task", "rounds": rounds, "block": 2}
    for mode in steps:
        summary = summarize(samples[mode], samples["plain"])
        row[mode] = {k: v for k, v in summary.items() if "median" in k or "ratio" in k}
    out["results"].append(row)
    print(num_tasks, {m: round(row[m]["ratio"], 3) for m in steps}, file=sys.stderr)
print(json.dumps(out, indent=1))
