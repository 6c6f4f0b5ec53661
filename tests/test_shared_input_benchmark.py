"""benchmarks/shared_input.py: its command line runs, and what it writes has every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_input.py"


def test_quick_run_writes_every_mode_and_method(tmp_path):
    out = tmp_path / "shared_input.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--tasks", "2", "--device", "cpu"]
    command += ["--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["timing"]["2"]
    assert set(rows) == {"plain", "exact", "exact-batched", "representation"}
    assert all(row["ratio"] > 0 for name, row in rows.items() if name != "plain")
    cosines = result["cosine_representation_vs_exact"]["2"]
    assert {"PCGrad", "GradDrop"} <= set(cosines)
    assert all(-1.0 <= c["min"] <= c["median"] <= c["max"] <= 1.0 + 1e-6 for c in cosines.values())
    assert len(result["load_average_before"]) == 3


def test_a_device_the_benchmarks_do_not_run_on_is_refused(tmp_path):
    out = tmp_path / "shared_input.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--device", "meta", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "CPU or a CUDA device, not 'meta'" in run.stderr
    assert not out.exists()
