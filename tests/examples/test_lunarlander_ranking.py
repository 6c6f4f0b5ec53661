"""The ranking of configurations (ranking.py) and its section of the report, on synthetic raw
files whose scores, and so whose ranking, IQM and probabilities of improvement, are known."""

import csv
import json

import numpy as np
import pytest
import ranking
import report
import train
from config import make_config
from envs import TASK_NAMES
from evaluate import EVAL_COLUMNS
from scipy import stats


def test_iqm_is_scipys_trimmed_mean():
    rng = np.random.default_rng(0)
    for n in (4, 9, 15, 16):
        values = rng.normal(size=n)
        assert ranking.iqm(values) == pytest.approx(stats.trim_mean(values, 0.25))
    # 5 seeds x 3 tasks pooled: the middle 9 of 15 scores.
    scores = np.arange(15.0).reshape(5, 3)
    assert ranking.aggregate_iqm(scores) == pytest.approx(7.0)


def test_probability_of_improvement_counts_wins_and_half_ties_per_task():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    y = np.array([[2.0, 4.0], [0.0, 6.0]])
    # Task 0: 3 of the 4 pairs won; task 1: 2 of 4. Averaged over tasks: 0.625.
    assert ranking.probability_of_improvement(x, y) == pytest.approx(0.625)
    assert ranking.probability_of_improvement(y, x) == pytest.approx(0.375)
    assert ranking.probability_of_improvement(x, x[:, ::-1]) == pytest.approx(0.5)
    same = np.full((3, 2), 7.0)
    assert ranking.probability_of_improvement(same, same) == 0.5


def test_intervals_of_the_stratified_bootstrap():
    constant = np.full((5, 3), 42.0)
    assert ranking.interval(constant, ranking.aggregate_mean) == (42.0, 42.0, 42.0)
    rng = np.random.default_rng(1)
    scores = rng.normal(100.0, 30.0, size=(5, 3))
    point, low, high = ranking.interval(scores, ranking.aggregate_mean, samples=4_000)
    assert point == pytest.approx(scores.mean())
    assert low < point < high
    # Each task's seeds are resampled on their own: a resample keeps every column's values.
    resamples = ranking.stratified_resamples(scores, rng, samples=50)
    for t in range(3):
        assert np.isin(resamples[:, :, t], scores[:, t]).all()
    better = scores + 1_000.0
    assert ranking.improvement_interval(better, scores, samples=500) == (1.0, 1.0, 1.0)


# Final returns per configuration: [seeds, tasks] (standard, windy, heavy).
SCORES = {
    "shared-blind": np.array(
        [[100, 90, 80], [110, 95, 85], [90, 85, 75], [105, 92, 81], [100, 90, 80]]
    ),
    "shared-aware": np.array([[150, 140, 130]] * 5) + np.arange(5)[:, None],
    "mgda-blind": np.array([[260, 240, 220]] * 3) + np.arange(3)[:, None],  # 3 seeds only
    "dwa-blind": np.array([[300, 250, 150]] * 5) + np.arange(5)[:, None],
}


def write_run(runs_dir, name, seed, returns, ms_per_update, **overrides):
    cfg = make_config(name, seed=seed, runs_dir=str(runs_dir), **overrides)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    with open(run_dir / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS)
        writer.writeheader()
        for phase, shift in (("periodic", -100.0), ("final", 0.0)):
            for t, task in enumerate(TASK_NAMES):
                for episode in range(2):  # mean of the two episodes: the given return
                    value = returns[t] + shift + (5.0 if episode else -5.0)
                    episodes = 50 if phase == "periodic" else 100
                    writer.writerow(
                        dict(episodes_per_task=episodes, phase=phase, task=task)
                        | dict(eval_episode=episode, seed=episode, length=100)
                        | {"return": value, "success": int(value >= 200)}
                    )
    with open(run_dir / "episodes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, train.EPISODE_COLUMNS)
        writer.writeheader()
        for episode in range(30):
            task = episode % len(TASK_NAMES)
            writer.writerow(
                dict(episode=episode, task=TASK_NAMES[task], task_episode=episode // 3)
                | {"return": float(returns[task]), "length": 100, "updates": 10}
            )
    summary = {"ms_per_update": ms_per_update, "env_steps_per_s": 1000.0, "wall_time_s": 600.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def synthetic_runs(tmp_path):
    for name, scores in SCORES.items():
        for seed, returns in enumerate(scores.astype(float)):
            write_run(tmp_path, name, seed, returns, ms_per_update=2.0 + seed)
    return tmp_path


def ranking_rows(text):
    section = text.split("## Ranking")[1].split("## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {row.split(" | ")[1]: row.strip("| ").split(" | ") for row in rows[1:]}


def test_report_ranks_the_configurations_from_raw_files(synthetic_runs, tmp_path):
    text = report.write_report(synthetic_runs, tmp_path / "out").read_text()
    rows = ranking_rows(text)
    order = sorted(rows, key=lambda name: int(rows[name][0]))
    assert order == ["mgda-blind", "dwa-blind", "shared-aware", "shared-blind"]
    mgda, dwa = rows["mgda-blind"], rows["dwa-blind"]
    assert mgda[2] == "3*" and dwa[2] == "5"  # fewer than five seeds: marked
    # The 3-task average and IQM of the seed x task scores, as computed by hand.
    assert mgda[3].startswith(f"{SCORES['mgda-blind'].mean():.1f} [")
    assert dwa[4].startswith(f"{stats.trim_mean(SCORES['dwa-blind'].ravel(), 0.25):.1f} [")
    # Every mgda run beats every baseline run on every task.
    assert mgda[5] == "1.00 [1.00, 1.00]" and mgda[6] == "1.00 [1.00, 1.00]"
    assert rows["shared-blind"][5] == "" and rows["shared-blind"][6].startswith("0.00")
    # Goal: average >= 230 and every task >= 200.
    assert mgda[-1] == "met"
    assert dwa[-1] == "worst task -48"  # heavy at 152 on average
    assert rows["shared-aware"][-1] == "average -88, worst task -68"
    cost = text.split("## Cost")[1].split("## ")[0]
    # ms per update 2, 3, 4: mean 3.0, range 2.0-4.0; the other two columns equal in every run.
    assert "| mgda-blind | 3.0 (2.0-4.0) | 1000.0 | 10.0 |" in cost


def test_learning_curves_have_a_row_per_family(synthetic_runs, tmp_path):
    runs = report.load_runs(synthetic_runs)
    assert report.families(runs) == {
        "loss weighting": ["dwa-blind"],
        "multiple-gradient descent": ["mgda-blind"],
    }
    colours = report.distinct_colours(40)
    assert len({tuple(c) for c in colours}) == 40
    report.write_report(synthetic_runs, tmp_path / "out")
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 0


def test_configurations_that_change_a_setting_get_rows_of_their_own(tmp_path):
    """A DQN setting (the soft target update) or a reference method's setting (GradNorm's
    alpha) puts a configuration in its own row, apart from the method comparison; BRC, PCGrad
    and GradNorm as the reference ran them share one."""
    names = [
        "shared-blind", "shared-aware", "brc", "pcgrad-blind", "gradnorm-aware",
        "gradnorm-blind-soft", "shared-aware-ddqn-huber", "gradnorm-blind-alpha0.5",
        "pcgrad-blind-sum", "cagrad-blind", "imtlg-blind",
    ]  # fmt: skip
    for name in names:
        write_run(tmp_path, name, 0, [100.0, 100.0, 100.0], ms_per_update=1.0)
    # An override of a whole study (`--quick` shortens the target update's period) moves no
    # configuration out of its row.
    write_run(tmp_path, "mgda-blind", 0, [100.0] * 3, ms_per_update=1.0, target_update_every=3)
    rows = report.families(report.load_runs(tmp_path))
    assert {family: sorted(names) for family, names in rows.items()} == {
        report.REFERENCE_METHODS: ["brc", "gradnorm-aware", "pcgrad-blind"],
        "gradient balancing": ["imtlg-blind"],
        "multiple-gradient descent": ["cagrad-blind", "mgda-blind"],
        report.METHOD_SETTINGS: ["gradnorm-blind-alpha0.5", "pcgrad-blind-sum"],
        report.DQN_SETTINGS: ["gradnorm-blind-soft", "shared-aware-ddqn-huber"],
    }


def test_a_collapsed_curve_does_not_set_the_scale_of_every_panel(tmp_path, monkeypatch):
    """The shared axis stops at AXIS_FLOOR and each panel names the curves it cuts off."""
    write_run(tmp_path, "shared-aware", 0, [150.0, 140.0, 130.0], ms_per_update=1.0)
    write_run(tmp_path, "dwa-blind", 0, [-2000.0, 100.0, 100.0], ms_per_update=1.0)
    axes_made = []
    subplots = report.plt.subplots

    def keep_axes(*args, **kwargs):
        fig, axes = subplots(*args, **kwargs)
        axes_made.append(axes)
        return fig, axes

    monkeypatch.setattr(report.plt, "subplots", keep_axes)
    report.plot_learning_curves(report.load_runs(tmp_path), tmp_path / "curves.png")
    (axes,) = axes_made
    assert axes[0][0].get_ylim()[0] == report.AXIS_FLOOR - 25
    notes = [[t.get_text() for t in ax.texts] for ax in axes[0]]
    # standard: -2000 (periodic -2100); the 3-task average: (-2100 + 0 + 0) / 3 = -700.
    assert notes == [
        ["below the axis:\ndwa-blind (to -2100)"],
        [],
        [],
        ["below the axis:\ndwa-blind (to -700)"],
    ]


def test_task_weights_are_each_tasks_share_of_the_weights(tmp_path):
    """Shares per episode (rows without weights, before the first update, left out), averaged
    over the episodes, then over the seeds with their range; the TD losses likewise; no section
    without either."""
    for seed, weights in enumerate(([2.0, 1.0, 1.0], [0.2, 0.2, 0.6])):
        write_run(tmp_path, "dwa-blind", seed, [100.0, 100.0, 100.0], ms_per_update=1.0)
        path = tmp_path / "dwa-blind" / f"seed-{seed}" / "episodes.csv"
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(rows):
            if i:  # the first row has no update, hence no weights
                columns = ["weight_standard", "weight_windy", "weight_heavy"]
                row.update(zip(columns, weights, strict=True))
                losses = [1.0, 2.0, 3.0] if seed == 0 else [3.0, 2.0, 1.0]
                row.update(zip(["loss_standard", "loss_windy", "loss_heavy"], losses, strict=True))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, train.EPISODE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    write_run(tmp_path, "shared-aware", 0, [150.0, 140.0, 130.0], ms_per_update=1.0)
    runs = report.load_runs(tmp_path)
    assert report.weight_shares(runs["shared-aware"][0]) is None
    section = "\n".join(report.weights_section(runs))
    # Seed 0: 0.5 / 0.25 / 0.25; seed 1: 0.2 / 0.2 / 0.6.
    assert "| dwa-blind | 2 | 0.35 (0.20-0.50) | 0.23 (0.20-0.25) | 0.42 (0.25-0.60) |" in section
    # The TD losses, per task: the mean over episodes, then over the seeds with the range.
    assert "| dwa-blind | 2 | 2.00 (1.00-3.00) | 2.00 (2.00-2.00) | 2.00 (1.00-3.00) |" in section
    assert "shared-aware |" not in section  # neither weights nor losses logged
    assert report.weights_section({"shared-aware": runs["shared-aware"]}) == []
