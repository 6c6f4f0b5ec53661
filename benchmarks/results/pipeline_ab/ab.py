"""Ratios to a plain step of gradsurgery's steps on the study network, as JSON on stdout.

BENCH=<tree>/benchmarks PYTHONPATH=<tree> python ab.py ROUNDS
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.environ.get("BENCH", "benchmarks"))
torch.set_num_threads(1)

import gradsurgery as gs  # noqa: E402

from methods import build_steps  # noqa: E402
from models import make_batches, make_model  # noqa: E402
from study import NETWORKS, NUM_TASKS, PER_TASK  # noqa: E402
from timing import clock_for, summarize, time_interleaved  # noqa: E402

KEYS = ["plain", "gs-pcgrad", "gs-pcgrad-fast", "gs-gradnorm", "gs-gradnorm-fast"]

torch.manual_seed(0)
model = make_model(NETWORKS[0])
batches = make_batches(model, NUM_TASKS, PER_TASK, count=16)
samples = time_interleaved(
    build_steps(KEYS, model, batches),
    warmup=20,
    rounds=int(sys.argv[1]),
    block=20,
    clock=clock_for(torch.device("cpu")),
)
out = {"file": gs.__file__}
for key in KEYS:
    summary = summarize(samples[key], samples["plain"])
    out[key] = {k: v for k, v in summary.items() if "median" in k or "ratio" in k}
print(json.dumps(out))
