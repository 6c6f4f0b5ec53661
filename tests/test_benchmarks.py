"""Smoke test of the benchmark runner: the smallest sizes, no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runner_writes_json_and_markdown(tmp_path: Path) -> None:
    command = [
        sys.executable, "benchmarks/run.py", "--quick", "--suite", "study", "scaling",
        "--models", "35K", "--tasks", "2", "--no-memory", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)

    study = json.loads((tmp_path / "study.json").read_text())
    methods = {row["method"] for row in study["results"]}
    assert {"plain", "gs-pcgrad", "gs-gradnorm", "straightforward-pcgrad"} <= methods
    assert {"reference-gradnorm"} <= methods
    for row in study["results"]:
        assert row["median_s"] > 0 and row["steps"] > 0 and row["ratio"] > 0
    assert study["machine"]["torch_threads"] == 1

    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert {(row["model"], row["tasks"]) for row in scaling["results"]} == {("35K", 2)}

    markdown = (tmp_path / "README.md").read_text()
    assert "## The issue's targets" in markdown and "| plain" in markdown


def test_memory_probe_reports_peak_rss() -> None:
    command = [
        sys.executable, "benchmarks/memory_probe.py", "--model", "35K", "--tasks", "2",
        "--per-task", "2", "--method", "gs-pcgrad",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert peak > 0
