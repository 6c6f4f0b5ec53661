"""Turn a runs folder into results.md and plots.

    python examples/lunarlander_mtl/report.py runs/

Reads only `<runs>/<config>/seed-<n>/{config.json, episodes.csv, eval.csv}`, so it works on
runs copied from elsewhere, and on a study still in progress (runs without a final
evaluation are listed but left out of the tables; curves use what each run has so far).

The headline number of a run is its final greedy evaluation: the mean return of 20
episodes per task on the fixed evaluation seeds. Across seeds we report the mean with a
95% percentile-bootstrap confidence interval (10,000 resamples of the seeds) and the
interquartile mean (IQM) of the seed x task scores, as rliable recommends for few runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
from config import BASELINE, CONFIGS, STUDY_CONFIGS, Config
from envs import TASK_NAMES
from evaluate import SUCCESS_RETURN
from ranking import FULL_SEEDS, iqm, ranking_table

BOOTSTRAP_SAMPLES = 10_000

# The single-run study this example reproduces (../shared/reference/study-design-notes.md):
# its 3-task average return and its change against the shared DQN with task embeddings.
# Where it gave only the change, the average is derived from it (202.9 * (1 + change)).
REFERENCE_BASELINE = 202.9
REFERENCE_CHANGE = {
    "shared-aware": 0.0,
    "gradnorm-blind": 0.086,
    "pcgrad-blind": -0.280,
    "brc": -0.672,
    "pcgrad-aware": -1.173,
    "gradnorm-aware": -1.334,
}
# The study's goal: a 3-task average of at least 230 with every task at least 200.
GOAL_AVERAGE = 230.0
GOAL_TASK = 200.0

REFERENCE_NOTES = {
    "gradnorm-blind": "weights near 1.64 / 1.21 / 0.15",
    "pcgrad-aware": "collapsed on heavy",
    "gradnorm-aware": "weights collapsed to about 2.66 / 0.009 (standard / windy)",
}


@dataclass
class Run:
    config_name: str
    seed: int
    config: dict
    episodes: dict[str, np.ndarray]  # column -> values (numbers; strings for 'task')
    evals: dict[str, np.ndarray]
    summary: dict = dataclasses.field(default_factory=dict)  # summary.json: the run's timings

    @property
    def finished(self) -> bool:
        return bool((self.evals.get("phase", np.array([])) == "final").any())

    def final_returns(self) -> np.ndarray:
        """[tasks] mean return of the final evaluation."""
        final = self.evals["phase"] == "final"
        return np.array(
            [self.evals["return"][final & (self.evals["task"] == t)].mean() for t in TASK_NAMES]
        )

    def final_success(self) -> np.ndarray:
        final = self.evals["phase"] == "final"
        return np.array(
            [
                (self.evals["return"][final & (self.evals["task"] == t)] >= SUCCESS_RETURN).mean()
                for t in TASK_NAMES
            ]
        )

    def last100_returns(self) -> np.ndarray:
        return np.array(
            [self.episodes["return"][self.episodes["task"] == t][-100:].mean() for t in TASK_NAMES]
        )


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        return {name: np.array([]) for name in header}
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        try:
            columns[name] = np.array([float(v) if v != "" else math.nan for v in values])
        except ValueError:  # a text column such as 'task' or 'phase'
            columns[name] = np.array(values)
    return columns


def load_runs(runs_dir: str | Path) -> dict[str, list[Run]]:
    """config name -> its runs, sorted by seed."""
    runs: dict[str, list[Run]] = {}
    for config_path in sorted(Path(runs_dir).glob("*/seed-*/config.json")):
        run_dir = config_path.parent
        if not (run_dir / "episodes.csv").exists() or not (run_dir / "eval.csv").exists():
            continue
        config = json.loads(config_path.read_text())
        summary_path = run_dir / "summary.json"
        run = Run(
            config["config_name"],
            int(config["seed"]),
            config,
            read_csv(run_dir / "episodes.csv"),
            read_csv(run_dir / "eval.csv"),
            json.loads(summary_path.read_text()) if summary_path.exists() else {},
        )
        runs.setdefault(run.config_name, []).append(run)
    order = [n for n in STUDY_CONFIGS if n in runs] + sorted(set(runs) - set(STUDY_CONFIGS))
    return {name: sorted(runs[name], key=lambda r: r.seed) for name in order}


# --- statistics ---------------------------------------------------------------------------


def bootstrap_ci(per_seed: np.ndarray, statistic=np.mean, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of `statistic` over resampled seeds; per_seed is [seeds, ...]."""
    n = len(per_seed)
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    resampled = per_seed[idx].reshape(BOOTSTRAP_SAMPLES, -1)
    stats = statistic(resampled, axis=1)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def curve_band(curves: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% bootstrap band over seeds of curves [seeds, points]."""
    n = len(curves)
    idx = np.random.default_rng(seed).integers(0, n, size=(1_000, n))
    means = curves[idx].mean(axis=1)
    return (
        curves.mean(axis=0),
        np.percentile(means, 2.5, axis=0),
        np.percentile(means, 97.5, axis=0),
    )


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values, ignoring NaN (episodes with no update)."""
    valid = ~np.isnan(x)
    sums = np.cumsum(np.where(valid, x, 0.0))
    counts = np.cumsum(valid)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def stack_prefix(curves: list[np.ndarray]) -> np.ndarray:
    """[seeds, points], cut to the shortest run (runs still in progress are shorter)."""
    length = min(len(c) for c in curves)
    return np.stack([c[:length] for c in curves])


# --- tables -------------------------------------------------------------------------------


def fmt_ci(mean: float, ci: tuple[float, float]) -> str:
    return f"{mean:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def results_markdown(runs: dict[str, list[Run]]) -> str:
    lines = ["# LunarLander multi-task study: results", ""]
    finished = {n: [r for r in rs if r.finished] for n, rs in runs.items()}
    finished = {n: rs for n, rs in finished.items() if rs}
    pending = [(n, r.seed) for n, rs in runs.items() for r in rs if not r.finished]
    if pending:
        lines += [
            f"Runs without a final evaluation yet (left out of the tables): "
            f"{', '.join(f'{n}/seed-{s}' for n, s in pending)}.",
            "",
        ]
    if not finished:
        return "\n".join([*lines, "No finished run yet.", ""])

    any_run = next(iter(finished.values()))[0].config
    lines += [
        f"Final greedy evaluation: {any_run['final_eval_episodes']} episodes per task on "
        f"fixed seeds after {any_run['episodes_per_task']} training episodes per task. "
        "Mean over seeds [95% bootstrap CI]. IQM: interquartile mean of the seed x task "
        f"scores. Change: 3-task average against `{BASELINE}`.",
        "",
        "| configuration | seeds | "
        + " | ".join(TASK_NAMES)
        + " | 3-task average | IQM | change vs "
        + BASELINE
        + " |",
        "|---|---|" + "---|" * (len(TASK_NAMES) + 3),
    ]
    averages = {n: np.array([r.final_returns().mean() for r in rs]) for n, rs in finished.items()}
    baseline = averages[BASELINE].mean() if BASELINE in averages else None
    for name, rs in finished.items():
        scores = np.stack([r.final_returns() for r in rs])  # [seeds, tasks]
        cells = [
            fmt_ci(scores[:, t].mean(), bootstrap_ci(scores[:, t])) for t in range(len(TASK_NAMES))
        ]
        cells.append(fmt_ci(averages[name].mean(), bootstrap_ci(averages[name])))
        cells.append(fmt_ci(float(iqm(scores.ravel())), bootstrap_ci(scores, iqm)))
        if baseline is None or baseline == 0:
            cells.append("n/a")
        else:
            cells.append(f"{100 * (averages[name].mean() - baseline) / abs(baseline):+.1f}%")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"Success rate (final evaluation, return >= {SUCCESS_RETURN:.0f}) and the mean "
        "return of the last 100 training episodes per task (epsilon-greedy), means over seeds.",
        "",
        "| configuration | "
        + " | ".join(f"success {t}" for t in TASK_NAMES)
        + " | success avg | "
        + " | ".join(f"last-100 {t}" for t in TASK_NAMES)
        + " | last-100 avg |",
        "|---|" + "---|" * (2 * len(TASK_NAMES) + 2),
    ]
    for name, rs in finished.items():
        success = np.stack([r.final_success() for r in rs]).mean(axis=0)
        last100 = np.stack([r.last100_returns() for r in rs]).mean(axis=0)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * s:.0f}%" for s in success)
            + f" | {100 * success.mean():.0f}% | "
            + " | ".join(f"{v:.1f}" for v in last100)
            + f" | {last100.mean():.1f} |"
        )

    lines += ranking_section(finished)
    lines += cost_section(finished)
    lines += weights_section(finished)
    lines += per_seed_table(finished)
    lines += reference_comparison(finished, averages)

    signal_lines = []
    for name, rs in finished.items():
        method = rs[0].config.get("method")
        if method == "pcgrad":
            rate = np.mean([np.nanmean(r.episodes["conflict_rate"]) for r in rs])
            signal_lines.append(f"| {name} | mean conflict rate over training: {rate:.3f} |")
        elif method == "gradnorm":
            cols = [f"weight_{t}" for t in TASK_NAMES]
            final_w = np.mean([[np.nanmean(r.episodes[c][-30:]) for c in cols] for r in rs], axis=0)
            text = ", ".join(f"{t} {w:.2f}" for t, w in zip(TASK_NAMES, final_w, strict=True))
            signal_lines.append(f"| {name} | final task weights (last 30 episodes): {text} |")
    if signal_lines:
        lines += [
            "",
            "| configuration | method signals (mean over seeds) |",
            "|---|---|",
            *signal_lines,
        ]
    lines += [
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![training returns](training_curves.png)",
        "",
    ]
    if any(rs[0].config.get("method") == "gradnorm" for rs in runs.values()):
        lines += ["![GradNorm weights](gradnorm_weights.png)", ""]
    if any(rs[0].config.get("method") == "pcgrad" for rs in runs.values()):
        lines += ["![PCGrad conflicts](pcgrad_conflicts.png)", ""]
    return "\n".join(lines)


def ranking_section(finished: dict[str, list[Run]]) -> list[str]:
    """Every configuration ranked, with rliable's aggregates (ranking.py)."""
    scores = {n: np.stack([r.final_returns() for r in rs]) for n, rs in finished.items()}
    lines = [
        "",
        "## Ranking",
        "",
        "All configurations by the mean of their seed x task final returns (the 3-task "
        "average). 95% intervals from a stratified bootstrap (each task's seeds resampled on "
        "their own, as rliable does). P(better than X): the probability that a run of the "
        "configuration beats a run of X on a task, averaged over the tasks (rliable's "
        f"probability of improvement; 0.5 is no difference). Goal: a 3-task average of at "
        f"least {GOAL_AVERAGE:.0f} with every task at least {GOAL_TASK:.0f} (means over seeds); "
        "otherwise the shortfall. Seeds marked * are fewer than "
        f"{FULL_SEEDS}: provisional.",
        "",
    ]
    return lines + ranking_table(scores, ("shared-blind", BASELINE), GOAL_AVERAGE, GOAL_TASK)


def cost_section(finished: dict[str, list[Run]]) -> list[str]:
    """Time per gradient update and environment steps per second, from summary.json."""
    lines = [
        "",
        "## Cost",
        "",
        "From each run's `summary.json` (the mean over the seeds that have it, and the "
        "smallest and largest): the wall time of one gradient update (sampling, TD losses, the "
        "method's backward and the optimizer step), environment steps per second over the "
        "whole run (acting, updates and evaluations), and the wall time of a run. Runs share "
        "their machine with other work, and runs made on machines of different speed differ "
        "by more than the methods do: these times compare methods only among runs of one "
        "machine. `benchmarks/` measures each method's step against a plain one, interleaved "
        "in one process.",
        "",
        "| configuration | ms per update | env steps/s | run wall time (min) |",
        "|---|---|---|---|",
    ]
    for name, rs in finished.items():
        cells = []
        for key, scale in (("ms_per_update", 1.0), ("env_steps_per_s", 1.0), ("wall_time_s", 60)):
            values = [r.summary[key] / scale for r in rs if key in r.summary]
            text = "n/a" if not values else f"{np.mean(values):.1f}"
            if len(values) > 1 and min(values) != max(values):
                text += f" ({min(values):.1f}-{max(values):.1f})"
            if values and len(values) < len(rs):
                text += f" ({len(values)} of {len(rs)} runs)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all("ms_per_update" not in r.summary for rs in finished.values() for r in rs):
        lines += ["", "No run here timed its updates (runs made before `ms_per_update` existed)."]
    return lines


def per_task_columns(run: Run, prefix: str) -> np.ndarray | None:
    """``[episodes, tasks]``: a run's ``<prefix><task>`` columns, the episodes with a value
    missing (before the first update) left out; ``None`` if the run has no such columns."""
    columns = [f"{prefix}{t}" for t in TASK_NAMES]
    if any(c not in run.episodes for c in columns):
        return None
    values = np.stack([run.episodes[c] for c in columns], axis=1).astype(float)
    return values[np.isfinite(values).all(axis=1)]


def weight_shares(run: Run) -> np.ndarray | None:
    """``[tasks]``: each task's share of the summed task weights, per training episode (the
    mean of its updates' weights), averaged over the episodes; ``None`` if none was logged."""
    weights = per_task_columns(run, "weight_")
    if weights is None:
        return None
    weights = weights[weights.sum(axis=1) != 0]
    return (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0) if len(weights) else None


def mean_losses(run: Run) -> np.ndarray | None:
    """``[tasks]``: each task's TD loss, the mean over the training episodes with updates."""
    losses = per_task_columns(run, "loss_")
    return losses.mean(axis=0) if losses is not None and len(losses) else None


def weights_section(finished: dict[str, list[Run]]) -> list[str]:
    """How each method that reports task weights shared them among the tasks over training,
    and every configuration's TD loss per task."""
    shares_text = (
        "The share of each task in the sum of the task weights a method gave (the weights of "
        "the losses, or of the per-task gradients), per training episode as the mean over its "
        "updates, then averaged over the episodes of the run: the mean over the seeds, and the "
        "smallest and largest. Equal weights give 0.33 each; a method whose weights have no "
        "common scale (Nash-MTL's) is compared by its shares."
    )
    losses_text = (
        "The TD loss of each task, unweighted, as the mean over a run's training episodes (each "
        "the mean of its updates): the mean over the seeds, and the smallest and largest. The "
        "losses depend on the data each policy collects, so they compare tasks within a "
        "configuration better than configurations."
    )
    shares = per_task_table(finished, weight_shares, shares_text, "share")
    losses = per_task_table(finished, mean_losses, losses_text, "TD loss")
    if not shares and not losses:
        return []
    return ["", "## Task weights", *shares, *losses]


def per_task_table(
    finished: dict[str, list[Run]],
    per_run: Callable[[Run], np.ndarray | None],
    text: str,
    column: str,
) -> list[str]:
    """A table of ``per_run``'s ``[tasks]`` values: per configuration, the mean over its seeds
    (smallest-largest); no table if no run has them."""
    rows = []
    for name, rs in finished.items():
        values = [v for v in map(per_run, rs) if v is not None]
        if values:
            values = np.stack(values)
            cells = [
                f"{values[:, t].mean():.2f} ({values[:, t].min():.2f}-{values[:, t].max():.2f})"
                for t in range(values.shape[1])
            ]
            rows.append(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        text,
        "",
        "| configuration | seeds | " + " | ".join(f"{column} {t}" for t in TASK_NAMES) + " |",
        "|---|---|" + "---|" * len(TASK_NAMES),
        *rows,
    ]


def per_seed_table(finished: dict[str, list[Run]]) -> list[str]:
    """Every run's final evaluation per task and averaged, and its method signal."""
    seeds = sorted({r.seed for rs in finished.values() for r in rs})
    lines = [
        "",
        "## Per seed",
        "",
        "Final evaluation per run: " + " / ".join(TASK_NAMES) + ", then the 3-task average. "
        "PCGrad: mean conflict rate over training; GradNorm: task weights over the last 30 "
        "episodes (" + " / ".join(TASK_NAMES) + ").",
        "",
        "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name, rs in finished.items():
        by_seed = {r.seed: r for r in rs}
        cells = []
        for seed in seeds:
            run = by_seed.get(seed)
            if run is None:
                cells.append("")
                continue
            returns = run.final_returns()
            cell = " / ".join(f"{v:.0f}" for v in returns) + f": **{returns.mean():.1f}**"
            method = run.config.get("method")
            if method == "pcgrad":
                cell += f"; conflicts {np.nanmean(run.episodes['conflict_rate']):.2f}"
            elif method == "gradnorm":
                weights = [np.nanmean(run.episodes[f"weight_{t}"][-30:]) for t in TASK_NAMES]
                cell += "; w " + " / ".join(f"{w:.2f}" for w in weights)
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def reference_comparison(finished: dict[str, list[Run]], averages: dict[str, np.ndarray]):
    """Our 3-task averages beside the reference study's single-run numbers, row by row.

    The reference is one run, so besides our 95% CI of the mean over seeds (where a mean
    would land) we say whether its number lies within the range of our single seeds (where
    one run would land). The reference does not say whether its average is a final greedy
    evaluation or a mean of the last training episodes, so both of ours are shown.
    """
    lines = [
        "",
        "## Against the reference study",
        "",
        "The reference is a single run per configuration (3-task average return, change against "
        f"`{BASELINE}`; averages in *italics* are derived from its stated change). Ours: the "
        "final greedy evaluation (mean [95% CI] over seeds, and the range of single seeds) and "
        "the mean of the last 100 training episodes. *In CI*: the reference average lies in "
        "our 95% CI; *in range*: it lies between our worst and best seed.",
        "",
        "| configuration | reference average | reference change | ours: final eval "
        "| ours: seed range | ours: change | ours: last-100 train | in CI | in range | "
        "reference note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours_baseline = averages[BASELINE].mean() if BASELINE in averages else None
    for name, change in REFERENCE_CHANGE.items():
        reference = REFERENCE_BASELINE * (1 + change)
        shown = (
            f"{reference:.1f}"
            if name == BASELINE or name == "gradnorm-blind"
            else (f"*{reference:.1f}*")
        )
        row = [name, shown, "baseline" if name == BASELINE else f"{100 * change:+.1f}%"]
        if name not in finished:
            lines.append("| " + " | ".join([*row, "not run", "", "", "", "", "", ""]) + " |")
            continue
        per_seed = averages[name]
        low, high = bootstrap_ci(per_seed)
        last100 = np.mean([r.last100_returns().mean() for r in finished[name]])
        ours_change = (
            "n/a"
            if ours_baseline in (None, 0)
            else f"{100 * (per_seed.mean() - ours_baseline) / abs(ours_baseline):+.1f}%"
        )
        row += [
            fmt_ci(per_seed.mean(), (low, high)),
            f"{per_seed.min():.1f} to {per_seed.max():.1f}",
            ours_change,
            f"{last100:.1f}",
            "yes" if low <= reference <= high else "no",
            "yes" if per_seed.min() <= reference <= per_seed.max() else "no",
            REFERENCE_NOTES.get(name, ""),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# --- plots --------------------------------------------------------------------------------


def plot_band(ax, x, curves, label, **kwargs) -> np.ndarray:
    """The mean over seeds with its 95% bootstrap band; returns the mean."""
    mean, lo, hi = curve_band(curves)
    (line,) = ax.plot(x, mean, label=label, **kwargs)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    return mean


# The lowest return the curve figures show: below it the axis would be a random policy's and
# worse, and a single collapsed configuration would set the scale of every panel.
AXIS_FLOOR = -400.0


# The learning-curve figures have one row of panels per family of methods, each against the
# two baselines: with every configuration in one panel no line could be followed. The
# configurations that change a setting rather than the method (of the DQN, or of a reference
# method) answer another question than the method comparison and get rows of their own.
BASELINES = ("shared-blind", BASELINE)
REFERENCE_METHODS = "the reference's methods"
METHOD_SETTINGS = "settings of the reference's methods"
DQN_SETTINGS = "DQN settings"  # target network, loss, update schedule
FAMILIES: dict[str, tuple[str, ...]] = {
    REFERENCE_METHODS: ("pcgrad", "gradnorm"),  # and the BRC network
    "loss weighting": ("uw", "imtll", "dwa", "rlw", "famo", "gls", "stch", "linearscalarization"),
    "gradient balancing": ("imtlg", "alignedmtl", "dbmtl"),
    "multiple-gradient descent": ("mgda", "cagrad", "nashmtl", "fairgrad"),
    "conflict removal (surgery, dual cones)": (
        "gradvac",
        "graddrop",
        "upgrad",
        "dualproj",
        "config",
    ),
    METHOD_SETTINGS: (),
    DQN_SETTINGS: (),
}
# Config fields whose change puts a configuration in one of the two settings rows.
DQN_SETTING_FIELDS = (
    "loss",
    "double_dqn",
    "update_every",
    "target_update",
    "target_update_every",
    "target_tau",
)
METHOD_SETTING_FIELDS = ("gradnorm_alpha", "pcgrad_reduction", "surgery_on_embedding")
BASELINE_STYLES = {
    "shared-blind": dict(color="black", linestyle="-"),
    BASELINE: dict(color="dimgray", linestyle="--"),
}


def family_of(run: Run) -> str:
    """The row of the learning-curve figures that shows ``run``'s configuration."""
    defaults = Config()
    # A named configuration's own settings decide, not overrides of a whole study (`--quick`
    # shortens the target update's period for every configuration); an unknown name, its run's.
    settings = CONFIGS.get(run.config_name, run.config)

    def changed(fields: tuple[str, ...]) -> bool:  # a field a run predates has its default
        return any(settings.get(f, getattr(defaults, f)) != getattr(defaults, f) for f in fields)

    if changed(DQN_SETTING_FIELDS):
        return DQN_SETTINGS
    if changed(METHOD_SETTING_FIELDS):
        return METHOD_SETTINGS
    if run.config.get("network") == "brc":
        return REFERENCE_METHODS
    method = run.config.get("method", "mean")
    return next((f for f, methods in FAMILIES.items() if method in methods), "other methods")


def families(runs: dict[str, list[Run]]) -> dict[str, list[str]]:
    """Family -> its configurations (baselines left out), families without one dropped."""
    out: dict[str, list[str]] = {}
    for name, rs in runs.items():
        if name not in BASELINES:
            out.setdefault(family_of(rs[0]), []).append(name)
    order = [*FAMILIES, "other methods"]
    return {f: out[f] for f in order if f in out}


def distinct_colours(count: int) -> list:
    """`count` colours, all different: tab10 (its gray left to the baselines), then more."""
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    palette += list(plt.get_cmap("Dark2").colors) + list(plt.get_cmap("Set1").colors)[:5]
    palette += [plt.get_cmap("tab20b")(i) for i in range(0, 20, 2)]
    palette += [plt.get_cmap("tab20c")(i) for i in range(0, 16, 2)]
    if count > len(palette):  # more configurations than named colours: evenly spaced hues
        palette = [plt.get_cmap("hsv")(i / count) for i in range(count)]
    return palette[:count]


def eval_curves(rs: list[Run]) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Greedy evaluation curves: x (episodes per task) and, per task, `[seeds, points]`."""
    # The first `eval_episodes` seeds of every evaluation, final included, are the same
    # episodes: comparing them keeps the curve consistent up to the last point.
    k = int(rs[0].config["eval_episodes"])
    per_task, xs = [], None
    for task in TASK_NAMES:
        curves = []
        for r in rs:
            e = r.evals
            if len(e.get("task", [])) == 0:
                continue
            keep = (e["task"] == task) & (e["eval_episode"] < k)
            x = np.unique(e["episodes_per_task"][keep])
            if len(x) == 0:
                continue
            curves.append(
                np.array([e["return"][keep & (e["episodes_per_task"] == v)].mean() for v in x])
            )
            xs = x if xs is None or len(x) < len(xs) else xs
        if not curves:
            return None
        per_task.append(stack_prefix(curves))
    length = min(len(xs), *(c.shape[1] for c in per_task))
    return xs[:length], [c[:, :length] for c in per_task]


def train_curves(rs: list[Run], window: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Training returns (`window`-episode means) per task, `[seeds, episodes]` each."""
    per_task = []
    for task in TASK_NAMES:
        curves = [
            rolling_mean(r.episodes["return"][r.episodes["task"] == task], window)
            for r in rs
            if len(r.episodes.get("return", [])) > 0
        ]
        curves = [c for c in curves if len(c)]
        if not curves:
            return None
        per_task.append(stack_prefix(curves))
    length = min(c.shape[1] for c in per_task)
    return np.arange(1, length + 1), [c[:, :length] for c in per_task]


def plot_family_grid(
    runs: dict[str, list[Run]],
    path: Path,
    curves_of: Callable[[list[Run]], tuple[np.ndarray, list[np.ndarray]] | None],
    columns: list[str],
    xlabel: str,
    ylabel: str,
) -> None:
    """One row per family of methods, one column per task (and the 3-task average when
    `columns` has one more entry): each family's configurations against the baselines, each
    configuration in its own colour throughout."""
    groups = families(runs) or {"baselines": []}
    members = [name for names in groups.values() for name in names]
    colours = dict(zip(members, distinct_colours(len(members)), strict=True))
    curves = {name: curves_of(rs) for name, rs in runs.items()}
    fig, axes = plt.subplots(
        len(groups),
        len(columns),
        figsize=(4.2 * len(columns), 3.4 * len(groups)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    lowest: dict[tuple[int, int], list[tuple[str, float]]] = {}  # panel -> (name, min of mean)
    for r, (row, (family, names)) in enumerate(zip(axes, groups.items(), strict=True)):
        shown = [(b, BASELINE_STYLES[b]) for b in BASELINES if b in runs]
        shown += [(name, dict(color=colours[name])) for name in names]
        for name, style in shown:
            if curves[name] is None:
                continue
            x, per_task = curves[name]
            panels = [*per_task, np.mean(per_task, axis=0)][: len(columns)]
            for c, (ax, panel) in enumerate(zip(row, panels, strict=True)):
                mean = plot_band(ax, x, panel, name, **style)
                lowest.setdefault((r, c), []).append((name, float(np.nanmin(mean))))
        for ax, title in zip(row, columns, strict=True):
            ax.set_title(f"{family}: {title}", fontsize=9)
            ax.axhline(SUCCESS_RETURN, color="gray", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
        row[0].set_ylabel(ylabel)
        row[-1].legend(fontsize=7, loc="lower right")
    # One collapsed run (a seed whose mean curve dips to -600) would squeeze every panel of
    # the shared axis into a band: the axis stops at AXIS_FLOOR and names what it cuts off,
    # but never cuts more than a quarter of the curves (short runs all dip below it).
    means = sorted(value for panel in lowest.values() for _, value in panel)
    if means:
        bottom = max(means[0], min(AXIS_FLOOR, means[len(means) // 4])) - 25
        axes[0][0].set_ylim(bottom, None)
        for (r, c), panel in lowest.items():
            cut = [f"{name} (to {value:.0f})" for name, value in panel if value < bottom]
            if cut:
                note = axes[r][c].text(
                    0.02, 0.02, "below the axis:\n" + "\n".join(cut),
                    transform=axes[r][c].transAxes, fontsize=6, va="bottom",
                )  # fmt: skip
                note.set_in_layout(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(runs: dict[str, list[Run]], path: Path) -> None:
    """Greedy evaluation return per task and averaged, against training episodes per task."""
    plot_family_grid(
        runs,
        path,
        eval_curves,
        [*TASK_NAMES, "3-task average"],
        "training episodes per task",
        "greedy evaluation return",
    )


def plot_training_curves(runs: dict[str, list[Run]], path: Path, window: int = 25) -> None:
    plot_family_grid(
        runs,
        path,
        lambda rs: train_curves(rs, window),
        list(TASK_NAMES),
        "training episode of the task",
        f"training return ({window}-episode mean)",
    )


def plot_signals(
    runs, path: Path, method: str, columns: list[str], ylabel: str, window: int = 25
) -> bool:
    chosen = {n: rs for n, rs in runs.items() if rs[0].config.get("method") == method}
    if not chosen:
        return False
    fig, axes = plt.subplots(
        1, len(chosen), figsize=(5 * len(chosen), 4), squeeze=False, sharey=True
    )
    for ax, (name, rs) in zip(axes[0], chosen.items(), strict=True):
        for column in columns:
            curves = [
                rolling_mean(r.episodes[column], window)
                for r in rs
                if len(r.episodes.get(column, [])) > 0
            ]
            if curves:
                stacked = stack_prefix(curves)
                plot_band(ax, np.arange(1, stacked.shape[1] + 1), stacked, column)
        ax.set_title(name)
        ax.set_xlabel("training episode (all tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"{ylabel} ({window}-episode mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(runs_dir)
    if not runs:
        raise SystemExit(f"no runs found under {runs_dir}")
    plot_learning_curves(runs, out_dir / "learning_curves.png")
    plot_training_curves(runs, out_dir / "training_curves.png")
    plot_signals(
        runs,
        out_dir / "gradnorm_weights.png",
        "gradnorm",
        [f"weight_{t}" for t in TASK_NAMES],
        "GradNorm task weight",
    )
    pair_columns = [c for c in next(iter(runs.values()))[0].episodes if c.startswith("cos_")]
    plot_signals(
        runs,
        out_dir / "pcgrad_conflicts.png",
        "pcgrad",
        ["conflict_rate", *pair_columns],
        "conflict rate / cosine",
    )
    out = out_dir / "results.md"
    out.write_text(results_markdown(runs))
    return out


# summary.json is derived from the others except for the run's wall time and throughput,
# which the study's README quotes: it travels with them.
RAW_FILES = ("config.json", "episodes.csv", "eval.csv", "summary.json")


def collect(runs_dir: str | Path, dest: str | Path) -> list[Path]:
    """Copy the raw files of every finished run (no checkpoints) to `dest/<config>/seed-<n>/`."""
    copied = []
    for name, runs in load_runs(runs_dir).items():
        for run in runs:
            if not run.finished:
                continue
            target = Path(dest) / name / f"seed-{run.seed}"
            target.mkdir(parents=True, exist_ok=True)
            for file in RAW_FILES:
                shutil.copyfile(Path(runs_dir) / name / f"seed-{run.seed}" / file, target / file)
            copied.append(target)
    return copied


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs_dir", nargs="?", default="runs", help="folder of runs")
    parser.add_argument("--out", default=None, help="output folder (default: runs_dir)")
    parser.add_argument(
        "--collect",
        metavar="DEST",
        default=None,
        help="instead of reporting, copy the raw files of the finished runs to DEST",
    )
    args = parser.parse_args()
    if args.collect:
        for target in collect(args.runs_dir, args.collect):
            print(target)
    else:
        print(write_report(args.runs_dir, args.out))
