"""The offline MultiMNIST benchmark (benchmarks/multimnist): the dataset's construction and a
tiny run of the whole command, whose summary is checked against its per-run files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MULTIMNIST = ROOT / "benchmarks" / "multimnist"
_MODULES = ("dataset", "network")


@pytest.fixture(scope="module")
def dataset():
    saved = {name: sys.modules.pop(name) for name in _MODULES if name in sys.modules}
    sys.path.insert(0, str(MULTIMNIST))
    try:
        import dataset

        yield dataset
    finally:
        sys.path.remove(str(MULTIMNIST))
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def data(dataset):
    return dataset.build(seed=0, train=600, validation=100, test=200)


def test_source_digits_of_train_and_test_are_disjoint_and_balanced(dataset, data) -> None:
    _, labels = dataset.load_source_digits()
    assert len(labels) == 5000
    fit = set(data.train.sources.flatten().tolist()) | set(
        data.validation.sources.flatten().tolist()
    )
    test = set(data.test.sources.flatten().tolist())
    assert not fit & test
    train_source, test_source = dataset.split_sources(
        labels, __import__("numpy").random.default_rng(0)
    )
    assert torch.bincount(torch.from_numpy(labels[train_source])).tolist() == [400] * 10
    assert torch.bincount(torch.from_numpy(labels[test_source])).tolist() == [100] * 10


def test_images_labels_and_determinism(dataset, data) -> None:
    _, labels = dataset.load_source_digits()
    for split in (data.train, data.validation, data.test):
        assert split.images.shape == (len(split), 1, 28, 28)
        assert float(split.images.min()) >= 0 and float(split.images.max()) <= 1
        assert torch.equal(split.labels, torch.from_numpy(labels)[split.sources])
        assert bool((split.sources[:, 0] != split.sources[:, 1]).all())
    again = dataset.build(seed=0, train=600, validation=100, test=200)
    assert torch.equal(again.train.images, data.train.images)
    other = dataset.build(seed=1, train=600, validation=100, test=200)
    assert not torch.equal(other.train.images, data.train.images)


def test_overlay_places_left_top_left_and_right_bottom_right(dataset) -> None:
    rng = np.random.default_rng(0)
    ones = np.full((50, 28, 28), 255, dtype=np.uint8)
    zeros = ones * 0
    left_only = dataset.overlay(ones, zeros, rng)
    right_only = dataset.overlay(zeros, ones, rng)
    # the left digit never reaches the last 4 rows/columns, the right never the first 4
    assert left_only[:, 32:, :].max() == 0 and left_only[:, :, 32:].max() == 0
    assert right_only[:, :4, :].max() == 0 and right_only[:, :, :4].max() == 0
    # and both always cover the central square they share at the largest shifts
    assert left_only[:, 8:28, 8:28].min() == 255 and right_only[:, 8:28, 8:28].min() == 255


def test_tiny_benchmark_run_and_its_summary(tmp_path: Path) -> None:
    command = [
        sys.executable, "benchmarks/multimnist/run.py", "--seeds", "0", "--methods", "Mean",
        "--fixed-grid", "0.5", "--epochs", "1", "--train-size", "512", "--out", str(tmp_path),
        "--representation", "PCGrad",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)

    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "per_run").glob("*.json")}
    assert set(runs) == {
        "SingleTask1_seed0", "SingleTask2_seed0", "Fixed0.5_seed0", "Mean_seed0", "PCGrad-rep_seed0"
    }  # fmt: skip
    assert runs["PCGrad-rep_seed0"]["representation"] and not runs["Mean_seed0"]["representation"]
    for run in runs.values():
        assert run["steps"] == 2 and run["train_size"] == 512
        assert all(0 <= a <= 1 for a in run["test_accuracy"] + run["validation_accuracy"])
        assert run["step_cpu_seconds_median"] > 0
        assert "gradsurgery_commit" in run  # None outside a git checkout

    with (tmp_path / "summary.csv").open() as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    single = [runs[f"SingleTask{k + 1}_seed0"]["test_accuracy"][k] for k in range(2)]
    mean = runs["Mean_seed0"]["test_accuracy"]
    expected = 100 * sum((b - m) / b for m, b in zip(mean, single, strict=True)) / 2
    assert float(table["Mean"]["delta_m_percent"]) == pytest.approx(expected)
    assert float(table["Mean"]["step_ratio_to_mean"]) == 1.0
    assert "| Mean | 1 |" in (tmp_path / "multimnist.md").read_text()
    assert table["PCGrad-rep"]["seeds"] == "1"
    assert (tmp_path / "multimnist_accuracy_vs_time.png").stat().st_size > 5_000
