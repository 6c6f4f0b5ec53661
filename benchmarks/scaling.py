"""Suite "scaling": step time and peak extra memory against the number of tasks and model size.

For T tasks of ``PER_TASK`` samples each and MLPs of about 35K, 1M and 10M parameters, the
plain step, gradsurgery's PCGrad (both engines) and the straightforward PCGrad loop are timed
interleaved in this process; then each method's peak memory is measured in a fresh process
(``memory_probe.py``). Large configurations get fewer steps: every configuration has a time
budget, with at least ``LEAST_ROUNDS`` rounds.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from methods import METHODS, available, build_steps
from models import SCALING_MODELS, make_batches, make_model, num_parameters
from timing import CPU, clock_for, rounds_for_budget, summarize, time_interleaved, time_one

TASKS = (2, 3, 5, 10, 20, 50)
MODELS = tuple(SCALING_MODELS)
QUICK_TASKS = (2, 5)
QUICK_MODELS = ("35K",)
PER_TASK = 16
METHOD_KEYS = ("plain", "gs-pcgrad", "gs-pcgrad-fast", "straightforward-pcgrad")
# Representative methods of each kind, at many tasks (where a solver or the Gramian could come
# to dominate) on the smaller models: a projection (UPGrad's quadratic program), a min-norm
# solver (MGDA), an iterative solver (NashMTL), a per-task-norms method (DB-MTL) and a loss
# weighting (UW), each with torchjd's implementation where it has one.
MANY_TASK_KEYS = (
    "gs-upgrad-fast", "torchjd-upgrad", "gs-mgda-fast", "torchjd-mgda", "gs-nashmtl-fast",
    "gs-dbmtl-fast", "gs-uw",
)  # fmt: skip
MANY_TASKS = (10, 20, 50)
MANY_TASK_MODELS = ("35K", "1M")
BUDGET_S = 20.0  # timed seconds per configuration (all methods together)
QUICK_BUDGET_S = 1.0
LEAST_ROUNDS = 3
MOST_ROUNDS = 100
PROBE = Path(__file__).resolve().parent / "memory_probe.py"
# glibc: serve every allocation of 64 KiB or more with its own mmap, and unmap it on free.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
MEMORY_CPU = (
    "peak RSS (VmHWM) of a fresh process running 2 steps of one method, minus that of the "
    "plain step; MALLOC_MMAP_THRESHOLD_=65536"
)
MEMORY_CUDA = (
    "torch.cuda.max_memory_allocated of a fresh process running 2 steps of one method, "
    "minus that of the plain step"
)


def run(
    quick: bool,
    tasks: tuple[int, ...] = TASKS,
    models: tuple[str, ...] = MODELS,
    memory: bool = True,
    device: torch.device = CPU,
    log=print,
) -> dict:
    """Time (and probe the memory of) every method for every (model, T)."""
    budget = QUICK_BUDGET_S if quick else BUDGET_S
    rows = []
    for model_name in models:
        for num_tasks in tasks:
            keys = _keys_for(model_name, num_tasks)
            timed = _time_config(model_name, num_tasks, keys, budget, device, log)
            gc.collect()  # free this configuration's models before the probes run
            if memory:
                _add_memory(timed, model_name, num_tasks, device, log)
            rows.extend(timed)
    return {
        "settings": {
            "device": str(device),
            "samples_per_task": PER_TASK,
            "tasks": list(tasks),
            "models": {name: SCALING_MODELS[name] for name in models},
            "budget_s_per_config": budget,
            "least_rounds": LEAST_ROUNDS,
            "memory": (MEMORY_CUDA if device.type == "cuda" else MEMORY_CPU) if memory else None,
            "many_task_methods": {
                "methods": list(MANY_TASK_KEYS),
                "tasks": list(MANY_TASKS),
                "models": list(MANY_TASK_MODELS),
            },
            "skipped_methods": [
                key for key in (*METHOD_KEYS, *MANY_TASK_KEYS) if not available(key)
            ],
        },
        "results": rows,
    }


def _keys_for(model_name: str, num_tasks: int) -> list[str]:
    """The methods timed for one configuration: PCGrad's rows always, the others at many tasks."""
    keys = list(METHOD_KEYS)
    if num_tasks in MANY_TASKS and model_name in MANY_TASK_MODELS:
        keys += MANY_TASK_KEYS
    return [key for key in keys if key in METHODS and available(key)]


def _time_config(
    model_name: str, num_tasks: int, keys: list[str], budget: float, device: torch.device, log
) -> list[dict]:
    torch.manual_seed(0)
    model = make_model(model_name).to(device)
    clock = clock_for(device)
    params = num_parameters(model)
    batches = make_batches(model, num_tasks, PER_TASK, count=4)
    steps = build_steps(keys, model, batches)
    # The first step of each method is untimed (it creates Adam's state and anything set up
    # lazily); its duration, an overestimate, sizes the run. Big configurations take a minute
    # per step for the loop, so they get no further warm-up and only LEAST_ROUNDS rounds.
    estimate = sum(time_one(step, repeat=1, clock=clock) for step in steps.values())
    block = 1 if estimate > 0.05 else 5
    rounds = rounds_for_budget(estimate, budget, block=block, least=LEAST_ROUNDS, most=MOST_ROUNDS)
    warmup = 0 if estimate > 1.0 else 3
    log(
        f"scaling/{model_name}/T={num_tasks}: ~{estimate:.3f} s per round of one step, "
        f"{rounds} rounds x {block}"
    )
    samples = time_interleaved(steps, warmup=warmup, rounds=rounds, block=block, clock=clock)
    matrix_bytes = num_tasks * params * 4  # one float32 [T, P] matrix
    return [
        {
            "model": model_name,
            "parameters": params,
            "tasks": num_tasks,
            "method": key,
            "label": METHODS[key].label,
            "tp_matrix_bytes": matrix_bytes,
            **summarize(samples[key], samples["plain"]),
        }
        for key in keys
    ]


def _add_memory(
    rows: list[dict], model_name: str, num_tasks: int, device: torch.device, log
) -> None:
    """Probe every method's peak memory in a fresh process; extra = peak - the plain step's."""
    peaks = {row["method"]: _probe(model_name, num_tasks, row["method"], device) for row in rows}
    log(
        f"scaling/{model_name}/T={num_tasks}: peak memory "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items())
    )
    key = "peak_cuda_bytes" if device.type == "cuda" else "peak_rss_bytes"
    for row in rows:
        row[key] = peaks[row["method"]]
        row["extra_bytes"] = peaks[row["method"]] - peaks["plain"]
        row["extra_over_tp_matrix"] = row["extra_bytes"] / row["tp_matrix_bytes"]


def _probe(model_name: str, num_tasks: int, method: str, device: torch.device) -> int:
    command = [
        sys.executable,
        str(PROBE),
        "--model",
        model_name,
        "--tasks",
        str(num_tasks),
        "--per-task",
        str(PER_TASK),
        "--method",
        method,
        "--device",
        str(device),
    ]
    env = {**os.environ, **PROBE_ENV}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
