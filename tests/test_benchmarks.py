"""Smoke test of the benchmark runner: the smallest sizes, no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level module names of benchmarks/ that other folders (the example) use too, and the
# benchmark modules that import them (dropped afterwards, so they are imported afresh).
_BENCHMARK_MODULES = (
    "baselines", "methods", "models", "report", "timing", "memory_probe", "multi_input_cnn",
)  # fmt: skip


@pytest.fixture
def benchmarks_importable():
    """``benchmarks/`` on ``sys.path``, and the example's same-named modules out of the way."""
    saved = {name: sys.modules.pop(name) for name in _BENCHMARK_MODULES if name in sys.modules}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for name in _BENCHMARK_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


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
    assert "## Performance targets" in markdown and "| plain" in markdown


def test_memory_probe_reports_peak_rss() -> None:
    command = [
        sys.executable, "benchmarks/memory_probe.py", "--model", "35K", "--tasks", "2",
        "--per-task", "2", "--method", "gs-pcgrad",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert reported["measure"] == "VmHWM"
    assert reported["peak_bytes"] >= reported["setup_peak_bytes"] > 0


@pytest.mark.usefixtures("benchmarks_importable")
def test_diagnostic_methods_compute_the_plain_step_s_gradient() -> None:
    # The diagnostics time pieces of a fast-engine step; they must do the plain step's work.
    import torch
    from methods import METHODS
    from models import make_batches, make_model

    torch.manual_seed(0)
    model = make_model("aware")
    batches = make_batches(model, 3, 8, count=2)
    grads, weights = {}, {}
    for key in ("plain", "engine-hooks", "engine-mean"):
        copy = make_model("aware")
        copy.load_state_dict(model.state_dict())
        step = METHODS[key].build(copy, batches)
        for _ in range(2):  # the second step's gradient is left in .grad
            step()
        grads[key] = torch.cat([p.grad.flatten() for p in copy.parameters()])
        weights[key] = torch.cat([p.detach().flatten() for p in copy.parameters()])
    assert grads["plain"].abs().sum() > 0
    torch.testing.assert_close(grads["engine-hooks"], grads["plain"], rtol=0, atol=0)
    torch.testing.assert_close(grads["engine-mean"], grads["plain"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights["engine-mean"], weights["plain"], rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("benchmarks_importable")
def test_steps_are_timed_with_the_device_s_clock() -> None:
    # CPU: the thread's CPU time, nothing to wait for. CUDA: wall time between two
    # synchronizations (checked where a GPU is). Other devices are refused by name.
    import torch
    from timing import CPU_CLOCK, clock_for, time_one

    assert clock_for(torch.device("cpu")) is CPU_CLOCK
    assert clock_for(torch.device("cpu")).name == "time.thread_time"
    with pytest.raises(ValueError, match="'meta'"):
        clock_for(torch.device("meta"))
    waits = []
    clock = type(CPU_CLOCK)("counting", CPU_CLOCK.now, lambda: waits.append(1))
    assert time_one(lambda: None, repeat=3, clock=clock) >= 0
    assert len(waits) == 6  # before and after each of the three steps
    if torch.cuda.is_available():
        assert "synchronize" in clock_for(torch.device("cuda")).name


@pytest.mark.usefixtures("benchmarks_importable")
def test_every_method_has_a_study_row_with_its_bound() -> None:
    # A method added to gradsurgery.methods is benchmarked without a hand-written row.
    import inspect

    from methods import GRADIENT_TARGET, LOSS_WEIGHTING_TARGET, METHODS

    import gradsurgery.methods as package
    from gradsurgery._weighting import Method, Needs

    classes = {
        cls
        for _, cls in inspect.getmembers(package, inspect.isclass)
        if issubclass(cls, Method) and cls.__name__ not in ("Mean", "LinearScalarization")
    }
    assert len(classes) >= 10
    for cls in classes:
        if cls.__name__ == "PCGrad":
            key = "gs-pcgrad-fast"  # the hand-written row
        else:
            suffix = "-fast" if cls.needs > Needs.LOSSES else ""
            key = f"gs-{cls.__name__.lower()}{suffix}".replace("gradnorm", "gradnorm-method")
        assert key in METHODS, f"no study row for {cls.__name__}"
        bound = GRADIENT_TARGET if cls.needs > Needs.LOSSES else LOSS_WEIGHTING_TARGET
        assert METHODS[key].target == bound
        assert not METHODS[key].peer or METHODS[key].peer in METHODS


def test_multi_input_cnn_quick_run_writes_every_mode(tmp_path: Path) -> None:
    command = [
        sys.executable, "benchmarks/multi_input_cnn.py", "--quick", "--tasks", "2",
        "--no-memory", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)

    result = json.loads((tmp_path / "multi_input_cnn.json").read_text())
    assert {(row["heads"], row["tasks"]) for row in result["results"]} == {
        ("shared", 2),
        ("per-task", 2),
    }
    modes = {"plain", "gs-pcgrad-fast", "gs-pcgrad", "gs-upgrad-fast", "gs-upgrad"}
    for row in result["results"]:
        assert set(row["timing"]) == modes
        assert all(
            timing["median_s"] > 0 and timing["ratio"] > 0 for timing in row["timing"].values()
        )
        assert set(row["agreement"]) == {"PCGrad", "UPGrad"}
        assert all(check["agree"] for check in row["agreement"].values())
        assert set(row["slow_layers"]) == {"gs-pcgrad-fast", "gs-upgrad-fast"}
    per_task = next(row for row in result["results"] if row["heads"] == "per-task")
    # Each per-task head is reached by its own task's loss only: the single backward's.
    assert per_task["slow_layers"]["gs-pcgrad-fast"] == {}
    assert result["machine"]["torch_threads"] == 1

    markdown = (tmp_path / "multi_input_cnn.md").read_text()
    assert "## Performance target" in markdown and "| PCGrad, batch-partition engine |" in markdown


def test_multi_input_cnn_memory_probe_reports_both_peaks() -> None:
    command = [
        sys.executable, "benchmarks/multi_input_cnn.py", "--probe", "gs-pcgrad-fast",
        "--tasks", "2", "--heads", "shared",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert reported["measure"] == "VmHWM"
    assert reported["first_bytes"] > 0 and reported["steady_bytes"] > 0


@pytest.mark.usefixtures("benchmarks_importable")
def test_multi_input_cnn_agreement_check_sees_a_different_update(monkeypatch) -> None:
    # The benchmark's engine check must be able to fail: give the fast engine's step another
    # method (the plain mean) and the combined gradients no longer agree.
    import multi_input_cnn
    import torch

    import gradsurgery as gs

    real = multi_input_cnn.make_optimizer

    def mean_when_fast(method, adam, engine):
        if engine is None:
            return real(method, adam, engine)
        return gs.MultiTaskOptimizer(adam, gs.methods.Mean(), engine=engine)

    device = torch.device("cpu")
    assert multi_input_cnn.agreement(2, "shared", "UPGrad", device)["agree"]
    monkeypatch.setattr(multi_input_cnn, "make_optimizer", mean_when_fast)
    check = multi_input_cnn.agreement(2, "shared", "UPGrad", device)
    assert not check["agree"]
    assert check["max_relative_grad_difference"] > multi_input_cnn.AGREEMENT_TOLERANCE
