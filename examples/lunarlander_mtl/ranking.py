"""Rank configurations from their seed x task scores, the way rliable does (Agarwal et al.
2021, "Deep RL at the edge of the statistical precipice"), in NumPy.

Scores are `[runs, tasks]` matrices: one row per seed, one column per task (the final greedy
evaluation). Intervals are 95% percentile intervals of a *stratified* bootstrap: for every
resample, each task's column draws its runs with replacement, independently of the other
tasks (rliable's `StratifiedBootstrap`); the two configurations of a probability of
improvement are resampled independently of each other (`StratifiedIndependentBootstrap`).
rliable itself would bring SciPy, arch and seaborn for these few lines.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
FULL_SEEDS = 5  # configurations with fewer finished seeds are marked as provisional


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% (scipy.stats.trim_mean(x, 0.25))."""
    values = np.sort(values, axis=axis)
    n = values.shape[axis]
    cut = int(0.25 * n)
    return np.take(values, range(cut, n - cut), axis=axis).mean(axis=axis)


def aggregate_mean(scores: np.ndarray) -> np.ndarray:
    """Mean of every score of each matrix: `[..., runs, tasks]` -> `[...]`."""
    return scores.reshape(*scores.shape[:-2], -1).mean(axis=-1)


def aggregate_iqm(scores: np.ndarray) -> np.ndarray:
    """IQM of every score of each matrix (runs and tasks pooled, as rliable's IQM)."""
    return iqm(scores.reshape(*scores.shape[:-2], -1), axis=-1)


def stratified_resamples(
    scores: np.ndarray, rng: np.random.Generator, samples: int = BOOTSTRAP_SAMPLES
) -> np.ndarray:
    """`[samples, runs, tasks]`: each task's runs drawn with replacement, per task."""
    runs, tasks = scores.shape
    idx = rng.integers(0, runs, size=(samples, runs, tasks))
    return np.take_along_axis(np.broadcast_to(scores, (samples, runs, tasks)), idx, axis=1)


def interval(
    scores: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
) -> tuple[float, float, float]:
    """(point estimate, 2.5th, 97.5th percentile) of `statistic` of a `[runs, tasks]` matrix."""
    rng = np.random.default_rng(seed)
    stats = statistic(stratified_resamples(scores, rng, samples))
    return float(statistic(scores)), *map(float, np.percentile(stats, [2.5, 97.5]))


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y): the chance that a run of X beats a run of Y on a task, averaged over tasks.

    `x` is `[..., runs_x, tasks]`, `y` is `[..., runs_y, tasks]`; each pair of runs counts 1
    when x's score is higher, 1/2 on a tie (the Mann-Whitney U statistic, normalized), as
    rliable's `probability_of_improvement`.
    """
    a, b = x[..., :, None, :], y[..., None, :, :]
    wins = (a > b).mean(axis=(-3, -2)) + 0.5 * (a == b).mean(axis=(-3, -2))
    return wins.mean(axis=-1)


def improvement_interval(
    x: np.ndarray, y: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float, float]:
    """P(X > Y) and its 95% interval, X and Y resampled independently (stratified)."""
    rng = np.random.default_rng(seed)
    stats = probability_of_improvement(
        stratified_resamples(x, rng, samples), stratified_resamples(y, rng, samples)
    )
    point = float(probability_of_improvement(x, y))
    return point, *map(float, np.percentile(stats, [2.5, 97.5]))


def fmt(estimate: tuple[float, float, float], digits: int = 1) -> str:
    point, low, high = estimate
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def ranking_table(
    scores: dict[str, np.ndarray],
    baselines: tuple[str, ...],
    goal_average: float,
    goal_task: float,
) -> list[str]:
    """Markdown rows ranking configurations by the mean of their seed x task scores.

    `scores` maps each configuration to its `[seeds, tasks]` final returns. The probability
    of improvement over a baseline is given where that baseline has runs.
    """
    present = [b for b in baselines if b in scores]
    header = (
        "| rank | configuration | seeds | 3-task average | IQM | "
        + "".join(f"P(better than {b}) | " for b in present)
        + "worst task | goal |"
    )
    lines = [header, "|---" * (6 + len(present)) + "|---|"]
    order = sorted(scores, key=lambda n: -float(scores[n].mean()))
    for rank, name in enumerate(order, start=1):
        s = scores[name]
        seeds = f"{len(s)}" if len(s) >= FULL_SEEDS else f"{len(s)}*"
        cells = [str(rank), name, seeds, fmt(interval(s, aggregate_mean))]
        cells.append(fmt(interval(s, aggregate_iqm)))
        for baseline in present:
            if baseline == name:
                cells.append("")
            else:
                cells.append(fmt(improvement_interval(s, scores[baseline]), digits=2))
        per_task = s.mean(axis=0)
        cells.append(f"{per_task.min():.1f}")
        cells.append(goal_cell(float(s.mean()), per_task, goal_average, goal_task))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_cell(average: float, per_task: np.ndarray, goal_average: float, goal_task: float) -> str:
    """'met', or how far the configuration is from the goal (average, then worst task)."""
    short = []
    if average < goal_average:
        short.append(f"average {average - goal_average:+.0f}")
    if per_task.min() < goal_task:
        short.append(f"worst task {per_task.min() - goal_task:+.0f}")
    return "met" if not short else ", ".join(short)
