"""Train the MultiMNIST model with one method and one seed; print one JSON line.

    python benchmarks/multimnist/train.py --method CAGrad --seed 0 [--epochs 10]
    python benchmarks/multimnist/train.py --method Fixed --weights 0.6 0.4 --seed 0
    python benchmarks/multimnist/train.py --method SingleTask --task 0 --seed 0
    python benchmarks/multimnist/train.py --method MGDA --representation --seed 0

``--representation`` runs the method on the gradients of the encoder's output (one backward
pass through the encoder, ``backward(losses, representation=features)``) instead of the
exact per-task gradients of the encoder's parameters.

One process per run, so that its peak memory is its own: the resident set's high-water mark
is reset (``/proc/self/clear_refs``) once the data and the model are built, and read
(``VmHWM``) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent))  # the shared method registry

import dataset  # noqa: E402
import method_registry  # noqa: E402
from network import MultiLeNet, head_losses  # noqa: E402

LR = 1e-3
BATCH = 256
EPOCHS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method", required=True, help="a registry name, Fixed (with --weights) or SingleTask"
    )
    parser.add_argument("--weights", type=float, nargs=2, help="for Fixed: w_1 w_2")
    parser.add_argument("--task", type=int, choices=[0, 1], help="for SingleTask")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--data-seed", type=int, default=0, help="of the dataset's construction")
    parser.add_argument("--train-size", type=int, default=9_000, help="(smaller for smoke runs)")
    parser.add_argument(
        "--representation",
        action="store_true",
        help="the method on the gradients of the encoder's output (a gradsurgery method only)",
    )
    return parser.parse_args(argv)


def entry_for(args: argparse.Namespace) -> method_registry.MethodEntry:
    if args.method == "Fixed":
        if args.weights is None:
            raise SystemExit("--method Fixed needs --weights w_1 w_2")
        return method_registry.fixed_weights_entry(args.weights)
    if args.method == "SingleTask":
        if args.task is None:
            raise SystemExit("--method SingleTask needs --task 0 or 1")
        weights = [1.0 if k == args.task else 0.0 for k in range(2)]
        return method_registry.fixed_weights_entry(weights)  # the other head stays untrained
    entry = method_registry.select([args.method])[args.method]
    if args.representation and entry.build_method is None:
        raise SystemExit(f"--representation needs a gradsurgery method, not {args.method}")
    return entry


def label(args: argparse.Namespace, entry: method_registry.MethodEntry) -> str:
    """The run's row in the summary: the method, ``-rep`` in representation mode."""
    if args.method == "SingleTask":
        return f"SingleTask{args.task + 1}"
    return entry.name + ("-rep" if args.representation else "")


@torch.no_grad()
def accuracy(model: MultiLeNet, split: dataset.Split) -> list[float]:
    model.eval()
    correct = torch.zeros(2)
    for start in range(0, len(split), 1000):
        outputs = model(split.images[start : start + 1000])
        labels = split.labels[start : start + 1000]
        correct += torch.stack([(o.argmax(1) == labels[:, k]).sum() for k, o in enumerate(outputs)])
    model.train()
    return (correct / len(split)).tolist()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_memory() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return False
    return True


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    data = dataset.build(args.data_seed, train=args.train_size)
    entry = entry_for(args)
    torch.manual_seed(args.seed)
    model = MultiLeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    step_fn = entry.training_step(optimizer, list(model.encoder.parameters()), 2)
    order = torch.Generator().manual_seed(args.seed)

    peak_reset = _reset_peak_memory()
    rss_before = _status_kib("VmRSS")
    step_seconds: list[float] = []
    nonfinite = 0
    started = time.perf_counter()
    for _ in range(args.epochs):
        permutation = torch.randperm(len(data.train), generator=order)
        for start in range(0, len(data.train), args.batch_size):
            index = permutation[start : start + args.batch_size]
            tick = time.thread_time()
            features = model.encoder(data.train.images[index])
            losses = head_losses(model, features, data.train.labels[index])
            step_fn.zero_grad()
            if args.representation:
                step_fn.backward(losses, representation=features)
            else:
                step_fn.backward(losses)
            step_fn.step()
            step_seconds.append(time.thread_time() - tick)
            nonfinite += not all(torch.isfinite(loss) for loss in losses)
        step_fn.end_epoch()
    wall = time.perf_counter() - started
    warm = sorted(step_seconds[5:]) or sorted(step_seconds)
    return {
        "method": label(args, entry),
        "representation": args.representation,
        "options": entry.options,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "train_size": len(data.train),
        "steps": len(step_seconds),
        "test_accuracy": accuracy(model, data.test),
        "validation_accuracy": accuracy(model, data.validation),
        "step_cpu_seconds_median": warm[len(warm) // 2],
        "step_cpu_seconds_mean": sum(step_seconds) / len(step_seconds),
        "train_wall_seconds": wall,
        "peak_rss_kib": _status_kib("VmHWM") if peak_reset else None,
        "rss_before_training_kib": rss_before,
        "nonfinite_steps": nonfinite,
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    print(json.dumps(run(parse_args())))
