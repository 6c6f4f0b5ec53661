"""Shared-input models: representation mode against the exact per-task gradients.

    python benchmarks/shared_input.py                 # ~3 min on 2 loaded cores
    python benchmarks/shared_input.py --quick         # smoke run
    python benchmarks/shared_input.py --device cuda   # results/cuda/shared_input.json

A small CNN (two 3x3 convolutions with max-pooling, then a 2048 -> 64 linear layer: the
shared representation ``z``) reads one batch of 32 RGB 32x32 images; every task has its own
``64 -> 10`` linear head and a cross-entropy loss on labels drawn by a fixed random teacher
network of its own. ``T`` = 2, 3 and 10 tasks. Three measurements, written to
``results/shared_input.json`` (``results/cuda/shared_input.json`` with ``--device cuda``):

- **time**: one training step (zero_grad, forward, the method's backward, SGD step), each
  mode interleaved in round-robin blocks in one process with ``time.thread_time`` (on CUDA:
  the wall clock between two synchronizations; see README.md), ratios to the plain step (mean
  of the losses, one ``backward()``) of the same rounds. Modes: ``exact`` (the default
  engine: one autograd call per task), ``exact-batched`` (``AutogradEngine(batched=True)``:
  one vectorized backward over the ``T`` task cotangents), ``representation``
  (``backward(losses, representation=z)``);
- **memory**: the peak resident set (``VmHWM``; on CUDA ``torch.cuda.max_memory_allocated``)
  of a fresh process that runs three steps of one mode, minus that of the plain step;
- **agreement**: the cosine between the update of representation mode and the exact update
  of every Gramian-reading method, over the encoder's parameters, on 8 batches along a short
  plain training run (the same weights and method state for both modes).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gradsurgery as gs
from gradsurgery import Needs
from gradsurgery._autograd import AutogradEngine

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_probe import peak_rss_bytes  # noqa: E402
from timing import clock_for, machine, summarize, time_interleaved  # noqa: E402

MODES = ("plain", "exact", "exact-batched", "representation")
CPU = torch.device("cpu")
BATCH = 32


class SharedInputCNN(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 64),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(64, 10) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


def make_batches(
    num_tasks: int, count: int, device: torch.device = CPU
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of images with one label per task from a fixed random teacher (made
    on the CPU, then moved: the same data on every device)."""
    torch.manual_seed(1234)
    teacher = SharedInputCNN(num_tasks)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            x = torch.randn(BATCH, 3, 32, 32)
            _, outs = teacher(x)
            batches.append((x, torch.stack([out.argmax(1) for out in outs])))
    return [(x.to(device), labels.to(device)) for x, labels in batches]


def build_step(
    mode: str, num_tasks: int, batches, method_name: str = "PCGrad", device: torch.device = CPU
):
    torch.manual_seed(0)
    model = SharedInputCNN(num_tasks).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = AutogradEngine(batched=mode == "exact-batched")
    opt = gs.MultiTaskOptimizer(sgd, method_class(method_name)(), engine=engine)
    position = iter(range(10**9))

    def step() -> None:
        x, labels = batches[next(position) % len(batches)]
        sgd.zero_grad()
        z, outs = model(x)
        losses = [nn.functional.cross_entropy(out, labels[t]) for t, out in enumerate(outs)]
        if mode == "plain":
            torch.stack(losses).mean().backward()
        elif mode == "representation":
            opt.backward(losses, representation=z)
        else:
            opt.backward(losses)
        sgd.step()

    return step


def method_class(name: str) -> type[gs.Method]:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(gs.methods.__path__):
        module = importlib.import_module(f"gradsurgery.methods.{info.name}")
        if inspect.isclass(cls := getattr(module, name, None)):
            return cls
    raise KeyError(name)


def gramian_methods() -> list[str]:
    import importlib
    import pkgutil

    names = []
    for info in pkgutil.iter_modules(gs.methods.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gradsurgery.methods.{info.name}")
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and issubclass(cls, gs.Method)
                and cls.__module__ == module.__name__
                and cls.needs >= Needs.NORMS
                and not inspect.signature(cls).parameters.get("num_tasks")
            ):
                names.append(cls.__name__)
    return sorted(names)


def agreement(
    num_tasks: int, count: int, device: torch.device = CPU
) -> dict[str, dict[str, float]]:
    """Cosine of the representation-mode and exact encoder updates, per method."""
    batches = make_batches(num_tasks, count, device)
    torch.manual_seed(0)
    base = SharedInputCNN(num_tasks).to(device)
    sgd = torch.optim.SGD(base.parameters(), lr=0.05)
    out: dict[str, dict[str, float]] = {}
    methods = {name: method_class(name)() for name in gramian_methods()}
    cosines: dict[str, list[float]] = {name: [] for name in methods}
    for x, labels in batches:
        for name, method in methods.items():
            updates = []
            for representation in (False, True):
                model = copy.deepcopy(base)
                trial = copy.deepcopy(method)
                if trial.generator is not None:
                    trial.generator.manual_seed(0)
                opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), trial)
                z, outs = model(x)
                losses = [nn.functional.cross_entropy(o, labels[t]) for t, o in enumerate(outs)]
                opt.backward(losses, representation=z if representation else None)
                encoder_grads = [p.grad.reshape(-1) for p in model.encoder.parameters()]
                updates.append(torch.cat(encoder_grads).double())  # float32 rounds past 1
            cosines[name].append(float(nn.functional.cosine_similarity(*updates, dim=0)))
            # The method's own state follows the exact mode (one step per batch).
            model = copy.deepcopy(base)
            opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
            z, outs = model(x)
            opt.backward([nn.functional.cross_entropy(o, labels[t]) for t, o in enumerate(outs)])
        # The shared weights move on with a plain step, so later batches see a trained model.
        sgd.zero_grad()
        _, outs = base(x)
        sum(nn.functional.cross_entropy(o, labels[t]) for t, o in enumerate(outs)).backward()
        sgd.step()
    for name, values in cosines.items():
        out[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "batches": len(values),
        }
    return out


def probe(mode: str, num_tasks: int, device: torch.device) -> None:
    torch.set_num_threads(1)
    step = build_step(mode, num_tasks, make_batches(num_tasks, 2, device), device=device)
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak}))


def memory(num_tasks: int, device: torch.device) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for mode in MODES:
        command = [
            sys.executable, __file__, "--probe", mode, "--tasks", str(num_tasks),
            "--device", str(device),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {mode: (peaks[mode] - peaks["plain"]) / 2**20 for mode in MODES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 10])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, help="JSON file (default: results/[cuda/]shared_input.json)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = clock_for(device)  # refuses a device the benchmarks do not run on
    if args.probe:
        probe(args.probe, args.tasks[0], device)
        return
    if args.out is None:
        args.out = (
            HERE / "results" / ("cuda" if device.type == "cuda" else "") / "shared_input.json"
        )
    torch.set_num_threads(1)
    rounds, block = (2, 2) if args.quick else (12, 4)
    started = time.perf_counter()
    result: dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/shared_input.py", *(argv or sys.argv[1:])]),
        "machine": machine(device),
        "load_average_before": os.getloadavg(),
        "timing": {},
        "memory_mib_over_plain": {},
        "cosine_representation_vs_exact": {},
    }
    for num_tasks in args.tasks:
        batches = make_batches(num_tasks, 4, device)
        steps = {mode: build_step(mode, num_tasks, batches, device=device) for mode in MODES}
        samples = time_interleaved(steps, warmup=2, rounds=rounds, block=block, clock=clock)
        rows = {mode: summarize(samples[mode], samples["plain"]) for mode in MODES}
        result["timing"][str(num_tasks)] = rows
        print(f"T={num_tasks}", {m: round(r.get("ratio", 1.0), 3) for m, r in rows.items()})
        if not args.quick:
            result["memory_mib_over_plain"][str(num_tasks)] = memory(num_tasks, device)
            print("  memory MiB over plain", result["memory_mib_over_plain"][str(num_tasks)])
    for num_tasks in args.tasks if not args.quick else args.tasks[:1]:
        cos = agreement(num_tasks, 2 if args.quick else 8, device)
        result["cosine_representation_vs_exact"][str(num_tasks)] = cos
        print(f"T={num_tasks} cosine", {k: round(v["median"], 3) for k, v in cos.items()})
    result["load_average_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
