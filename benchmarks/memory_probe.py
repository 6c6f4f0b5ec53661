"""Peak resident memory of a process that runs only one method's training steps.

Run by the scaling suite, once per (model, tasks, method), in a fresh process:

    python benchmarks/memory_probe.py --model 1M --tasks 10 --method gs-pcgrad

and prints one JSON object. On a CUDA device (``--device cuda``) the peak is PyTorch's
``torch.cuda.max_memory_allocated``. PyTorch has no allocator statistics for CPU tensors, and
``tracemalloc`` does not see them, so on the CPU the probe reads the kernel's high-water mark
of the process's resident set (``VmHWM`` in ``/proc/self/status``). The same set-up with the
plain step gives the reference; the difference is the method's peak extra memory. The parent
starts the probe with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so every large tensor is its
own mapping, returned to the kernel when freed: the high-water mark then follows the tensors
alive at once rather than the allocator's caching.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import build_steps
from models import make_batches, make_model

# Two steps: the first creates Adam's state, the second is a steady-state step.
STEPS = 2


def peak_rss_bytes() -> int:
    """High-water mark of the resident set (``VmHWM``), falling back to ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--per-task", type=int, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        peak, measure = lambda: torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    else:
        peak, measure = peak_rss_bytes, "VmHWM"
    model = make_model(args.model).to(device)
    batches = make_batches(model, args.tasks, args.per_task, count=2)
    step = build_steps([args.method], model, batches)[args.method]
    before = peak()
    for _ in range(STEPS):
        step()
    print(json.dumps({"peak_bytes": peak(), "setup_peak_bytes": before, "measure": measure}))


if __name__ == "__main__":
    main()
