"""What the per-task heads cost the batch-partition engine, in milliseconds, as JSON on stdout.

On the multi-input CNN with per-task heads (each head applied to its task's 32 rows): the
``T`` per-task autograd calls the engine made for the heads' parameters before, one autograd
call for all the heads (for scale), and the graph walk that now finds the parameters one task
alone reaches, so that they come from the single backward instead. Medians of ``REPEATS``
forward passes, ``time.thread_time``, 1 torch thread.

    python benchmarks/results/per_task_heads/heads_cost.py REPEATS
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
torch.set_num_threads(1)

from multi_input_cnn import make_batches, make_model  # noqa: E402

from gradsurgery._autograd import task_jacobian  # noqa: E402
from gradsurgery._partition.reach import sole_tasks  # noqa: E402

from timing import machine  # noqa: E402

device = torch.device("cpu")
repeats = int(sys.argv[1])
out = {"command": "python " + " ".join(sys.argv), "machine": machine(device), "results": []}
for num_tasks in (3, 10):
    model = make_model(num_tasks, "per-task", device)
    batch = make_batches(num_tasks, 1, device)[0]
    params = list(model.parameters())
    heads = list(model.heads.parameters())
    times: dict[str, list[float]] = {"per_task_calls": [], "one_call": [], "walk": []}
    for _ in range(repeats):
        logits = model(batch.images, batch.task_sizes)
        labels = batch.labels.split(batch.task_sizes)
        losses = [nn.functional.cross_entropy(o, y) for o, y in zip(logits, labels, strict=True)]
        start = time.thread_time()
        task_jacobian(losses, heads, retain_graph=True)
        middle = time.thread_time()
        torch.autograd.grad(losses, heads, retain_graph=True)
        end = time.thread_time()
        sole_tasks(losses, params, range(len(params)))
        times["per_task_calls"].append(middle - start)
        times["one_call"].append(end - middle)
        times["walk"].append(time.thread_time() - end)
    row = {"tasks": num_tasks, "repeats": repeats}
    row.update({f"{k}_ms": statistics.median(v[2:]) * 1e3 for k, v in times.items()})
    out["results"].append(row)
    print(row, file=sys.stderr)
print(json.dumps(out, indent=1))
