"""Suite "study": one training step on the LunarLander study's network, 3 tasks x 64 samples.

Every method available here is timed in the same process, interleaved, for the blind and the
aware network; the ratios are to the plain step (mean of the three losses, one backward).
"""

from __future__ import annotations

import torch

from methods import METHODS, available, build_steps
from models import make_batches, make_model, num_parameters
from timing import CPU, clock_for, summarize, time_interleaved

NUM_TASKS = 3
PER_TASK = 64
NETWORKS = ("blind", "aware")

# (warm-up steps, rounds, steps per block); a full run times 25 x 10 = 250 steps per method
# (about 45 methods on two networks).
FULL = (20, 25, 10)
QUICK = (3, 3, 3)


def run(quick: bool, device: torch.device = CPU, log=print) -> dict:
    """Time every available method on both networks; returns the suite's JSON payload."""
    warmup, rounds, block = QUICK if quick else FULL
    keys = [key for key in METHODS if available(key)]
    rows = []
    for network in NETWORKS:
        torch.manual_seed(0)
        model = make_model(network).to(device)
        batches = make_batches(model, NUM_TASKS, PER_TASK, count=16)
        log(f"study/{network}: {len(keys)} methods x {rounds * block} steps on {device}")
        samples = time_interleaved(
            build_steps(keys, model, batches),
            warmup=warmup,
            rounds=rounds,
            block=block,
            clock=clock_for(device),
        )
        for key in keys:
            rows.append(
                {
                    "network": network,
                    "parameters": num_parameters(model),
                    "method": key,
                    "label": METHODS[key].label,
                    "target": METHODS[key].target,
                    "peer": METHODS[key].peer if available(METHODS[key].peer or key) else "",
                    **summarize(samples[key], samples["plain"]),
                }
            )
    return {
        "settings": {
            "device": str(device),
            "num_tasks": NUM_TASKS,
            "samples_per_task": PER_TASK,
            "warmup_steps": warmup,
            "rounds": rounds,
            "steps_per_block": block,
            "skipped_methods": [key for key in METHODS if not available(key)],
        },
        "results": rows,
    }
