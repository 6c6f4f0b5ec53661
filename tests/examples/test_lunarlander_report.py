import shutil

import numpy as np
import pytest
import report
import train
from config import QUICK_OVERRIDES, make_config


def test_iqm_and_bootstrap():
    assert report.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert report.iqm(np.array([0.0, 1.0, 2.0, 100.0])) == pytest.approx(1.5)
    assert report.iqm(np.array([7.0])) == 7.0
    lo, hi = report.bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert 1.0 <= lo < 3.0 < hi <= 5.0
    assert report.bootstrap_ci(np.array([2.0])) == (2.0, 2.0)
    np.testing.assert_allclose(
        report.rolling_mean(np.array([1.0, np.nan, 3.0, 5.0]), 2), [1.0, 1.0, 3.0, 4.0]
    )


@pytest.fixture(scope="module")
def two_configs(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    for name in ("shared-aware", "gradnorm-blind"):
        for seed in (0, 1):
            cfg = make_config(
                name,
                seed=seed,
                runs_dir=str(runs_dir),
                progress=False,
                tensorboard=False,
                **QUICK_OVERRIDES,
            )
            train.train(cfg)
    return runs_dir


def test_report_from_csv_files_only(two_configs, tmp_path):
    runs_dir = tmp_path / "copy"
    shutil.copytree(two_configs, runs_dir)
    for extra in runs_dir.glob("*/seed-*/*"):
        if extra.name not in ("config.json", "episodes.csv", "eval.csv"):
            extra.unlink()
    out = report.write_report(runs_dir)
    text = out.read_text()
    assert "| shared-aware | 2 |" in text and "| gradnorm-blind | 2 |" in text
    assert "+0.0%" in text  # the baseline against itself
    assert "final task weights" in text
    for png in ("learning_curves", "training_curves", "gradnorm_weights"):
        assert (runs_dir / f"{png}.png").exists()
    assert not (runs_dir / "pcgrad_conflicts.png").exists()  # no PCGrad run here


def test_report_lists_unfinished_runs(two_configs, tmp_path):
    runs_dir = tmp_path / "copy"
    shutil.copytree(two_configs, runs_dir)
    eval_csv = runs_dir / "gradnorm-blind" / "seed-1" / "eval.csv"
    lines = eval_csv.read_text().splitlines(keepends=True)
    eval_csv.write_text("".join(line for line in lines if ",final," not in line))
    text = report.write_report(runs_dir, tmp_path / "out").read_text()
    assert "gradnorm-blind/seed-1" in text
    assert "| gradnorm-blind | 1 |" in text


def test_tensorboard_logging_when_available(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(train, "SummaryWriter", FakeWriter)
    cfg = make_config("pcgrad-blind", runs_dir=str(tmp_path), progress=False, **QUICK_OVERRIDES)
    train.train(cfg)
    tags = {tag for tag, _, _ in scalars}
    assert {"train/standard/return", "train/conflict_rate", "eval/final/return_avg"} <= tags


def test_report_sets_the_reference_beside_our_results(two_configs):
    text = report.write_report(two_configs).read_text()
    section = text.split("## Against the reference study")[1].split("\n\n")[2]  # the table
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()[2:]}
    assert "202.9" in rows["shared-aware"] and "baseline" in rows["shared-aware"]
    assert "220.3" in rows["gradnorm-blind"] and "+8.6%" in rows["gradnorm-blind"]
    assert "*146.1*" in rows["pcgrad-blind"] and "not run" in rows["pcgrad-blind"]
    assert "weights near 1.64 / 1.21 / 0.15" in rows["gradnorm-blind"]
    assert rows["gradnorm-blind"].count(" | ") == 9


def test_per_seed_table_matches_each_runs_final_evaluation(two_configs):
    runs = report.load_runs(two_configs)
    text = report.write_report(two_configs).read_text()
    section = text.split("## Per seed")[1].split("## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| gradnorm-blind |"))
    cells = row.strip("| ").split(" | ")[1:]
    assert len(cells) == 2  # seeds 0 and 1
    for run, cell in zip(runs["gradnorm-blind"], cells, strict=True):
        assert f"**{run.final_returns().mean():.1f}**" in cell
        assert "; w " in cell  # GradNorm's final weights
