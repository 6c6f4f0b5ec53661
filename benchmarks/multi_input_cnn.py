"""Multi-input CNN: one training step on task-partitioned images, per method and engine.

    python benchmarks/multi_input_cnn.py            # results/multi_input_cnn.{json,md}
    python benchmarks/multi_input_cnn.py --quick    # smoke run, written to results/quick/

Every task has its own images (multi-domain vision, LibMTL's Office-31 setting): the batch is
the concatenation of ``T`` batches of 32 RGB 32x32 images, task 0's rows first, and task
``t``'s loss is the cross-entropy on its own rows. The network is LeNet-sized: three 3x3
convolutions (16, 32, 64 channels), each followed by GroupNorm and ReLU, max-pooling after
the first two and global average pooling after the third, a 64 -> 64 linear layer, and either
one 10-way head shared by every task (``shared``) or one head per task applied to that task's
rows (``per-task``). ``T`` = 3, 5 and 10; ``Adam(lr=1e-3, fused=True)``. Four measurements:

- **time**: one training step (zero_grad, forward, the method's backward, Adam step), every
  mode interleaved in round-robin blocks in one process with ``timing.time_interleaved``
  (``time.thread_time`` on the CPU, see README.md), ratios to the plain step (mean of the
  losses, one ``backward()``) of the same rounds. Modes: ``gs.PCGrad`` and ``gs.UPGrad`` each
  with ``BatchPartitionEngine(model, verify="first")`` (``-fast``) and with the default engine
  (one autograd call per task);
- **memory**: the peak of a fresh process per mode, minus the plain step's: the resident set
  (``VmHWM``) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. ``first steps``: over
  the first two steps (the engine's one check against per-task autograd, Adam's state);
  ``steady``: over the next two, after the peak is reset;
- **agreement**: outside the timing, the fast engine's combined gradient and updated weights
  against the default engine's, from the same weights over three steps;
- **slow layers**: the layers the batch-partition engine differentiated per task, and why
  (none: a per-task head reads only its task's rows, but only its task's loss reaches it, so
  its gradient comes from the single backward too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import gradsurgery as gs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_probe import peak_rss_bytes  # noqa: E402
from report import _machine as machine_lines  # noqa: E402
from timing import Step, clock_for, machine, summarize, time_interleaved  # noqa: E402

PER_TASK = 32
CLASSES = 10
LR = 1e-3
HEADS = ("shared", "per-task")
TARGET = 1.3  # a batch-partition step / the plain step, at T = TARGET_TASKS
TARGET_TASKS = 3
AGREEMENT_STEPS = 3
AGREEMENT_TOLERANCE = 1e-4  # relative, per parameter; float32 sums in another order
SUITE = "multi_input_cnn"


@dataclass(frozen=True)
class Mode:
    """A timed step: the method (``None``: the plain step) and whether it uses the fast engine."""

    label: str
    method: str | None
    fast: bool = False


MODES = {
    "plain": Mode("plain step (mean of the losses, one backward)", None),
    "gs-pcgrad-fast": Mode("PCGrad, batch-partition engine", "PCGrad", fast=True),
    "gs-pcgrad": Mode("PCGrad, default engine", "PCGrad"),
    "gs-upgrad-fast": Mode("UPGrad, batch-partition engine", "UPGrad", fast=True),
    "gs-upgrad": Mode("UPGrad, default engine", "UPGrad"),
}
METHODS = ("PCGrad", "UPGrad")


class MultiInputCNN(nn.Module):
    """A LeNet-sized CNN over task-partitioned images: per-task logits from one forward pass."""

    def __init__(self, num_tasks: int, heads: str) -> None:
        super().__init__()
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
        )
        self.shared_head = heads == "shared"
        self.heads = nn.ModuleList(
            nn.Linear(64, CLASSES) for _ in range(1 if self.shared_head else num_tasks)
        )

    def forward(self, images: Tensor, task_sizes: list[int]) -> list[Tensor]:
        features = self.features(images)
        if self.shared_head:
            return list(self.heads[0](features).split(task_sizes))
        return [
            head(rows) for head, rows in zip(self.heads, features.split(task_sizes), strict=True)
        ]


@dataclass(frozen=True)
class Batch:
    images: Tensor
    labels: Tensor
    task_sizes: list[int]


def make_batches(num_tasks: int, count: int, device: torch.device) -> list[Batch]:
    """``count`` batches of ``num_tasks x PER_TASK`` random images with random labels."""
    generator = torch.Generator().manual_seed(1234)
    sizes = [PER_TASK] * num_tasks
    return [
        Batch(
            torch.randn(sum(sizes), 3, 32, 32, generator=generator).to(device),
            torch.randint(CLASSES, (sum(sizes),), generator=generator).to(device),
            sizes,
        )
        for _ in range(count)
    ]


def make_model(num_tasks: int, heads: str, device: torch.device) -> MultiInputCNN:
    torch.manual_seed(0)  # every mode starts from the same weights
    return MultiInputCNN(num_tasks, heads).to(device)


def make_optimizer(
    method: str, adam: torch.optim.Optimizer, engine: gs.BatchPartitionEngine | None
) -> gs.MultiTaskOptimizer:
    options = {"engine": engine} if engine is not None else {}
    if method == "PCGrad":  # its random projection order, the same for every engine
        return gs.PCGrad(adam, generator=torch.Generator().manual_seed(0), **options)
    if method == "UPGrad":
        return gs.UPGrad(adam, **options)
    raise KeyError(method)


def build_step(
    mode: str, model: MultiInputCNN, batches: list[Batch]
) -> tuple[Step, gs.BatchPartitionEngine | None]:
    """One training step of ``mode`` on ``model`` cycling through ``batches``, and its engine."""
    spec = MODES[mode]
    adam = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    engine = gs.BatchPartitionEngine(model, verify="first") if spec.fast else None
    optimizer = make_optimizer(spec.method, adam, engine) if spec.method else None
    position = iter(range(10**9))

    def step() -> None:
        batch = batches[next(position) % len(batches)]
        adam.zero_grad()
        recording = engine.record(batch.task_sizes) if engine else contextlib.nullcontext()
        with recording:
            logits = model(batch.images, batch.task_sizes)
        labels = batch.labels.split(batch.task_sizes)
        losses = [
            nn.functional.cross_entropy(out, y) for out, y in zip(logits, labels, strict=True)
        ]
        if optimizer is None:
            (sum(losses) / len(losses)).backward()
        else:
            optimizer.backward(losses)
        adam.step()

    return step, engine


def agreement(num_tasks: int, heads: str, method: str, device: torch.device) -> dict:
    """The fast engine's update against the default engine's, step by step from the same weights.

    Before each of ``AGREEMENT_STEPS`` steps (on the same batches) the fast engine's model takes
    the default one's weights, so that the comparison is of the engines, not of how far two
    trajectories drift apart. Compared: the combined gradient each writes into ``.grad`` (the
    method's update direction, which decides agreement) and the change Adam makes to the
    weights; each difference is ``|fast - default| / |default|`` per parameter, the largest.
    """
    batches = make_batches(num_tasks, AGREEMENT_STEPS, device)
    models = {fast: make_model(num_tasks, heads, device) for fast in (True, False)}
    steps = {
        fast: build_step(f"gs-{method.lower()}{'-fast' if fast else ''}", model, batches)[0]
        for fast, model in models.items()
    }
    params = {fast: list(model.parameters()) for fast, model in models.items()}

    def largest_difference(fast: list[Tensor], default: list[Tensor]) -> float:
        return max(
            float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
            for a, b in zip(fast, default, strict=True)
        )

    worst_grad = worst_update = 0.0
    for _ in range(AGREEMENT_STEPS):
        with torch.no_grad():
            for a, b in zip(params[True], params[False], strict=True):
                a.copy_(b)
        before = [p.detach().clone() for p in params[False]]
        for fast in (True, False):
            steps[fast]()  # zero_grad, forward, the method's backward, Adam's step
        grads = {fast: [p.grad for p in params[fast]] for fast in (True, False)}
        updates = {
            fast: [p.detach() - b for p, b in zip(params[fast], before, strict=True)]
            for fast in (True, False)
        }
        worst_grad = max(worst_grad, largest_difference(grads[True], grads[False]))
        worst_update = max(worst_update, largest_difference(updates[True], updates[False]))
    return {
        "max_relative_grad_difference": worst_grad,
        "max_relative_update_difference": worst_update,
        "steps": AGREEMENT_STEPS,
        "agree": worst_grad <= AGREEMENT_TOLERANCE,
    }


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Writing 5 to clear_refs resets the VmHWM high-water mark (Linux 4.0 and later).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def probe(mode: str, num_tasks: int, heads: str, device: torch.device) -> None:
    """In a fresh process: the peak over the first two steps, then over two more."""
    torch.set_num_threads(1)
    if device.type == "cuda":
        peak, measure = lambda: torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    else:
        peak, measure = peak_rss_bytes, "VmHWM"
    step, _ = build_step(
        mode, make_model(num_tasks, heads, device), make_batches(num_tasks, 2, device)
    )
    for _ in range(2):
        step()
    first = peak()
    try:
        _reset_peak(device)
        for _ in range(2):
            step()
        steady: int | None = peak()
    except OSError:  # no clear_refs: the steady-state peak is not measurable here
        steady = None
    print(json.dumps({"first_bytes": first, "steady_bytes": steady, "measure": measure}))


def memory(num_tasks: int, heads: str, device: torch.device) -> dict[str, dict[str, float | None]]:
    """Each mode's peak minus the plain step's, in MiB, from one fresh process per mode."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see memory_probe.py
    peaks = {}
    for mode in MODES:
        command = [
            sys.executable, __file__, "--probe", mode, "--tasks", str(num_tasks),
            "--heads", heads, "--device", device.type,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])

    def over_plain(mode: str, key: str) -> float | None:
        if peaks[mode][key] is None or peaks["plain"][key] is None:
            return None
        return (peaks[mode][key] - peaks["plain"][key]) / 2**20

    return {
        mode: {
            "first_steps": over_plain(mode, "first_bytes"),
            "steady": over_plain(mode, "steady_bytes"),
        }
        for mode in MODES
    }


def run(args: argparse.Namespace, command: str) -> dict:
    device = torch.device(args.device)
    clock = clock_for(device)
    warmup, rounds, block = (1, 2, 1) if args.quick else (2, 10, 4)
    started = time.perf_counter()
    result: dict = {
        "command": command,
        "machine": machine(device),
        "loadavg_start": os.getloadavg(),
        "settings": {
            "tasks": args.tasks,
            "heads": args.heads,
            "per_task": PER_TASK,
            "image": [3, 32, 32],
            "classes": CLASSES,
            "optimizer": f"Adam(lr={LR}, fused=True)",
            "warmup": warmup,
            "rounds": rounds,
            "block": block,
            "target": TARGET,
            "target_tasks": TARGET_TASKS,
            "agreement_tolerance": AGREEMENT_TOLERANCE,
        },
        "modes": {key: mode.label for key, mode in MODES.items()},
        "results": [],
    }
    for heads in args.heads:
        for num_tasks in args.tasks:
            batches = make_batches(num_tasks, 4, device)
            built = {
                mode: build_step(mode, make_model(num_tasks, heads, device), batches)
                for mode in MODES
            }
            steps = {mode: step for mode, (step, _) in built.items()}
            samples = time_interleaved(
                steps, warmup=warmup, rounds=rounds, block=block, clock=clock
            )
            row: dict = {
                "heads": heads,
                "tasks": num_tasks,
                "parameters": sum(
                    p.numel() for p in make_model(num_tasks, heads, device).parameters()
                ),
                "timing": {mode: summarize(samples[mode], samples["plain"]) for mode in MODES},
                "slow_layers": {
                    mode: engine.slow_layers() for mode, (_, engine) in built.items() if engine
                },
                "agreement": {m: agreement(num_tasks, heads, m, device) for m in METHODS},
            }
            if args.memory and (not args.quick or num_tasks == args.tasks[0]):
                row["memory_mib_over_plain"] = memory(num_tasks, heads, device)
            result["results"].append(row)
            ratios = {mode: round(t["ratio"], 2) for mode, t in row["timing"].items()}
            print(f"{heads} heads, T={num_tasks}: x plain {ratios}", flush=True)
    result["loadavg_end"] = os.getloadavg()
    result["duration_s"] = time.perf_counter() - started
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def markdown(result: dict) -> str:
    """The results page: the targets, step times, memory, agreement and the machine."""
    rows = result["results"]
    tasks = sorted({row["tasks"] for row in rows})
    lines = [
        "# Multi-input CNN: one training step",
        "",
        "Generated by `benchmarks/multi_input_cnn.py`; see `benchmarks/README.md` for what is "
        f"measured. {PER_TASK} RGB 32x32 images per task, each task its own; "
        f"{result['settings']['optimizer']}.",
        "",
        "## Performance target",
        "",
        "| target | measured | met? |",
        "|---|---|---|",
    ]
    for row in rows:
        if row["tasks"] != TARGET_TASKS:
            continue
        for mode in MODES:
            if MODES[mode].fast:
                ratio = row["timing"][mode]["ratio"]
                lines.append(
                    f"| T={TARGET_TASKS}, {row['heads']} heads: {MODES[mode].label} "
                    f"<= {TARGET}x plain | {ratio:.2f}x | {'yes' if ratio <= TARGET else 'no'} |"
                )
    lines += [
        "",
        "## Step time",
        "",
        "Median ms per step, its ratio to the plain step and, in brackets, the interquartile "
        "range of the ratio computed per round.",
        "",
    ]
    for heads in result["settings"]["heads"]:
        by_tasks = {row["tasks"]: row for row in rows if row["heads"] == heads}
        first = next(iter(by_tasks.values()))
        lines += [
            f"**{heads} heads** ({first['parameters']:,} parameters at T={first['tasks']})",
            "",
            "| mode | " + " | ".join(f"T={t}" for t in tasks if t in by_tasks) + " |",
            "|---|" + "---|" * len(by_tasks),
        ]
        for mode, spec in MODES.items():
            cells = []
            for t in tasks:
                if t not in by_tasks:
                    continue
                timing = by_tasks[t]["timing"][mode]
                cell = f"{_ms(timing['median_s'])} ms"
                if mode != "plain":
                    cell += (
                        f", {timing['ratio']:.2f}x "
                        f"[{timing['ratio_q1']:.2f}-{timing['ratio_q3']:.2f}]"
                    )
                cells.append(cell)
            lines.append(f"| {spec.label} | " + " | ".join(cells) + " |")
        lines.append("")
    measured = [row for row in rows if "memory_mib_over_plain" in row]
    if measured:
        lines += [
            "## Peak memory over the plain step",
            "",
            "MiB; *first steps*: the first two steps (the engine's check against per-task "
            "autograd, Adam's state); *steady*: the next two.",
            "",
            "| heads | T | mode | first steps | steady |",
            "|---|---|---|---|---|",
        ]
        for row in measured:
            for mode, extra in row["memory_mib_over_plain"].items():
                if mode == "plain":
                    continue
                first, steady = (
                    "n/a" if v is None else f"{v:.1f}"
                    for v in (extra["first_steps"], extra["steady"])
                )
                label = MODES[mode].label
                lines.append(f"| {row['heads']} | {row['tasks']} | {label} | {first} | {steady} |")
        lines.append("")
    lines += [
        "## The batch-partition engine against the default engine",
        "",
        f"Largest relative difference per parameter over {AGREEMENT_STEPS} steps, each from the "
        "same weights: of the combined gradient written into `.grad` (they agree when it is "
        f"within {AGREEMENT_TOLERANCE:g}) and of the change Adam's step makes to the weights.",
        "",
        "| heads | T | method | combined gradient | weight change | agree |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for method, check in row["agreement"].items():
            lines.append(
                f"| {row['heads']} | {row['tasks']} | {method} | "
                f"{check['max_relative_grad_difference']:.1e} | "
                f"{check['max_relative_update_difference']:.1e} | "
                f"{'yes' if check['agree'] else 'NO'} |"
            )
    slow = {
        f"`{name}`: {why}"
        for row in rows
        for layers in row["slow_layers"].values()
        for name, why in layers.items()
    }
    lines += ["", "Layers the batch-partition engine differentiated per task:"]
    lines += [f"- {entry}" for entry in sorted(slow)] if slow else ["none."]
    lines += ["", *machine_lines(result)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T = 3, a few steps")
    parser.add_argument("--tasks", type=int, nargs="+", help="numbers of tasks (3 5 10)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", type=Path, help="folder of the JSON and Markdown files")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tasks = args.tasks or ([TARGET_TASKS] if args.quick else [3, 5, 10])
    torch.set_num_threads(1)
    if args.probe:
        probe(args.probe, args.tasks[0], args.heads[0], torch.device(args.device))
        return
    command = shlex.join(["python", "benchmarks/multi_input_cnn.py", *(argv or sys.argv[1:])])
    result = run(args, command)
    out = args.out or HERE / "results" / ("quick" if args.quick else "") / (
        "cuda" if args.device.startswith("cuda") else ""
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{SUITE}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{SUITE}.md").write_text(markdown(result))
    failed = [
        f"{row['heads']} heads, T={row['tasks']}, {method}"
        for row in result["results"]
        for method, check in row["agreement"].items()
        if not check["agree"]
    ]
    print(f"wrote {out / SUITE}.json and .md in {result['duration_s']:.0f} s")
    if failed:
        sys.exit(f"the batch-partition engine's update differs from the default one's: {failed}")


if __name__ == "__main__":
    main()
