"""Interleaved step timing and the machine description stored with every result.

Background load on a shared machine comes and goes. Timing each method in its own stretch
would charge one method with a slow stretch; instead the methods run in round-robin blocks
(method A for a few steps, then B, then C, then A again, ...), so a busy minute slows all of
them alike. Each step is timed on its own with the device's :class:`Clock` (below); a method's
time is the median over all its steps, and its ratio to the plain step is also computed per
round (the medians of the same round) to show how much the ratio itself moves.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

Step = Callable[[], None]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Clock:
    """How a step is timed on a device: ``sync()``, ``now()``, the step, ``sync()``, ``now()``."""

    name: str
    now: Callable[[], float]
    sync: Callable[[], None]


def _no_sync() -> None:
    pass


# On the CPU, the CPU time of this thread, not wall time: on a shared machine the process is
# descheduled now and then, and wall time charges those pauses to whichever step they land in
# (more often to the longer steps, which inflates their ratios). With
# ``torch.set_num_threads(1)`` every operation, the backward pass included, runs on this
# thread, so its CPU time is the step's cost. Nanosecond resolution on Linux.
CPU_CLOCK = Clock("time.thread_time", time.thread_time, _no_sync)


def clock_for(device: torch.device) -> Clock:
    """The clock for steps on ``device``: CPU time on the CPU, synchronized wall time on CUDA."""
    if device.type == "cpu":
        return CPU_CLOCK
    if device.type == "cuda":
        # Kernels run asynchronously and their time is not this thread's: wait for the device
        # before and after the step, and read the wall clock.
        return Clock("time.perf_counter + torch.cuda.synchronize", time.perf_counter,
                     partial(torch.cuda.synchronize, device))  # fmt: skip
    raise ValueError(f"benchmarks run on the CPU or a CUDA device, not {device.type!r}")


@dataclass
class Samples:
    """Per-step times of one method, and the median of each round."""

    times: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)


def time_interleaved(
    steps: dict[str, Step], *, warmup: int, rounds: int, block: int, clock: Clock = CPU_CLOCK
) -> dict[str, Samples]:
    """Time every step function ``rounds`` times ``block`` steps, in round-robin blocks.

    ``warmup`` untimed steps of each method come first (allocator, Adam state, lazy inits).
    The order of the methods rotates every round so that none is always first after a
    ``gc.collect()`` or always last.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    clock.sync()
    samples = {name: Samples() for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()  # outside the timed region: no method pays for another's garbage
            block_times = []
            for _ in range(block):
                clock.sync()
                start = clock.now()
                steps[name]()
                clock.sync()
                block_times.append(clock.now() - start)
            samples[name].times.extend(block_times)
            samples[name].round_medians.append(statistics.median(block_times))
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); with fewer than two values all three are the value itself."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarize(samples: Samples, reference: Samples | None) -> dict[str, float | int]:
    """Median, IQR and step count of one method; its ratios to ``reference`` if given."""
    q1, median, q3 = quartiles(samples.times)
    out: dict[str, float | int] = {
        "median_s": median,
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "steps": len(samples.times),
    }
    if reference is not None:
        out["ratio"] = median / statistics.median(reference.times)
        per_round = [
            a / b for a, b in zip(samples.round_medians, reference.round_medians, strict=True)
        ]
        r1, _, r3 = quartiles(per_round)
        out["ratio_q1"], out["ratio_q3"] = r1, r3
    return out


def rounds_for_budget(
    step_seconds: float, budget_s: float, *, block: int, least: int, most: int
) -> int:
    """How many rounds fit in ``budget_s`` when one round (all methods) takes ``step_seconds``
    per step; at least ``least`` (the median needs a few) and at most ``most``."""
    per_round = max(step_seconds * block, 1e-9)
    return max(least, min(most, int(budget_s / per_round)))


def time_one(step: Step, repeat: int = 2, clock: Clock = CPU_CLOCK) -> float:
    """Smallest of ``repeat`` single-step times: a quick estimate to size the run."""
    best = float("inf")
    for _ in range(repeat):
        clock.sync()
        start = clock.now()
        step()
        clock.sync()
        best = min(best, clock.now() - start)
    return best


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device = CPU) -> dict[str, object]:
    """What the numbers depend on: versions, CPU (and GPU), threads, cores, memory, date."""
    import gradsurgery

    from baselines import torchjd_version

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clock": clock_for(device).name,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradsurgery": gradsurgery.__version__,
        # GRADSURGERY_COMMIT names the commit when the package is a snapshot outside git.
        "gradsurgery_commit": os.environ.get("GRADSURGERY_COMMIT")
        or git_commit(Path(gradsurgery.__file__).parent),
        "torchjd": torchjd_version(),
        "platform": platform.platform(),
    }


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])  # MemTotal
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def git_commit(package_dir: Path) -> str | None:
    """The commit the measured gradsurgery comes from, with ``+dirty`` for local edits."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=package_dir, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
