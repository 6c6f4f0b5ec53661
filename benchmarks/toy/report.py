"""Figures and tables of the toy benchmark, from its raw outputs alone.

    python benchmarks/toy/report.py [--results DIR] [--dest DIR]

For each ``<setting>.json`` + ``<setting>_trajectories.csv`` of ``--results``: the contour
figure (``<setting>.png``: one panel per method, the average loss's contours, the Pareto set,
every start's trajectory) and the table (``<setting>.md``) in ``--dest``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from problem import PARETO_X1, PARETO_X2, toy_losses

HERE = Path(__file__).resolve().parent
START_COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]


def read(results: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The summary, and per method the trajectories ``[records, starts, 2]``."""
    summary = json.loads((results / f"{name}.json").read_text())
    rows = defaultdict(lambda: defaultdict(list))
    with (results / f"{name}_trajectories.csv").open() as file:
        for row in csv.DictReader(file):
            rows[row["method"]][int(row["start"])].append((float(row["x1"]), float(row["x2"])))
    paths = {m: np.array([by_start[s] for s in sorted(by_start)]).transpose(1, 0, 2)
             for m, by_start in rows.items()}  # fmt: skip
    return summary, paths


def figure(summary: dict, paths: dict[str, np.ndarray], dest: Path) -> None:
    scale = summary["setting"]["scale_of_loss_1"]
    grid = np.linspace(-10, 10, 300)
    xx, yy = np.meshgrid(grid, grid)
    points = torch.tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float64)
    average = toy_losses(points, scale).mean(dim=1).view(xx.shape).numpy()

    names = list(summary["methods"])
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.7 * rows), squeeze=False,
                             sharex=True, sharey=True)  # fmt: skip
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        ax.contour(xx, yy, average, levels=15, cmap="viridis", linewidths=0.6)
        ax.plot(PARETO_X1, [PARETO_X2] * 2, color="0.55", linewidth=4, zorder=1)
        for s, start in enumerate(summary["setting"]["starts"]):
            path = paths[name][:, s]
            color = START_COLORS[s % len(START_COLORS)]
            ax.plot(path[:, 0], path[:, 1], color=color, linewidth=1.2, zorder=3)
            ax.plot(*start, "o", color="k", markersize=4, zorder=4)
            ax.plot(*path[-1], "*", color=color, markeredgecolor="k", markeredgewidth=0.4,
                    markersize=9, zorder=5)  # fmt: skip
        failed = summary["methods"][name]["failure"]
        ax.set_title(name + (" (failed)" if failed else ""), fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    steps, done = summary["setting"]["steps"], summary["steps_done"]
    progress = f"{steps:,}" if done >= steps else f"{done:,} of {steps:,} (partial run)"
    fig.suptitle(f"{summary['setting']['name']}: {progress} Adam steps, loss 1 scaled by {scale:g}"
                 " (contours: average loss; gray: Pareto set; *: end point)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    starts = summary["setting"]["starts"]
    header = "| method | seconds | " + " | ".join(
        f"start ({s[0]:g}, {s[1]:g}): end x / losses / distance to Pareto set" for s in starts
    ) + " |"  # fmt: skip
    lines = [header, "|---|---:|" + "---|" * len(starts)]
    for name, result in summary["methods"].items():
        cells = []
        for end in result["ends"]:
            x1, x2 = end["x"]
            l1, l2 = end["losses"]
            cells.append(f"({x1:.2f}, {x2:.2f}) / ({l1:.2f}, {l2:.2f}) / "
                         f"{end['distance_to_pareto_set']:.2f}")  # fmt: skip
        label = name + (f" (failed: {result['failure']})" if result["failure"] else "")
        if result["steps_done"] < summary["setting"]["steps"]:
            label += f" (partial: {result['steps_done']:,} steps)"
        lines.append(f"| {label} | {result['seconds']:.1f} | " + " | ".join(cells) + " |")
    machine = summary["machine"]
    lines += [
        "",
        f"torch {machine['torch']}, Python {machine['python']}, {machine['torch_threads']} torch "
        f"thread(s), {machine['cpu_count']} CPUs. Seconds: CPU time of each method's own "
        "computation over all starts, plus an equal share of the batch's common work (losses, "
        "Jacobians, Adam) for the methods run batched (*wrapper*: the whole loop).",
        "",
    ]
    runs: dict[str, list[str]] = defaultdict(list)
    for name, result in summary["methods"].items():
        run = result["run"]
        key = (f"`{run['command']}` at {run['gradsurgery_commit'][:7]}"
               + (" (library files modified)" if any(run["gradsurgery_modified"]) else "")
               + f", {run['date']}, load average {run['load_average'][0]:.1f}, "
               f"{run['wall_seconds']:.0f} s wall")  # fmt: skip
        runs[key].append(f"{name} ({result['path']})")
    lines += [f"- {key}: {', '.join(names)}" for key, names in runs.items()]
    return "\n".join(lines) + "\n"


def write(results: Path, name: str, dest: Path | None = None, table_suffix: str = ".md") -> None:
    dest = results if dest is None else dest
    dest.mkdir(parents=True, exist_ok=True)
    summary, paths = read(results, name)
    figure(summary, paths, dest / f"toy_{name}.png")
    (dest / f"toy_{name}{table_suffix}").write_text(table(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--dest", type=Path)
    args = parser.parse_args()
    for path in sorted(args.results.glob("*.json")):
        write(args.results, path.stem, args.dest)


if __name__ == "__main__":
    main()
