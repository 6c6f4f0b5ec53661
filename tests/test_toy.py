"""The toy benchmark (benchmarks/toy): the problem's derivatives, the batched driver against
the library's own training step, a property the papers state, and a short run of the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "benchmarks" / "toy"
_MODULES = ("problem", "trajectories", "run", "report", "method_registry")


@pytest.fixture
def toy():
    """The toy benchmark's modules, imported from its folder and forgotten afterwards."""
    saved = {name: sys.modules.pop(name) for name in _MODULES if name in sys.modules}
    sys.path[:0] = [str(TOY), str(TOY.parent)]
    try:
        import problem
        import run
        import trajectories

        yield problem, trajectories, run
    finally:
        for path in (str(TOY), str(TOY.parent)):
            sys.path.remove(path)
        for name in _MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _points() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(2000, 2, generator=generator, dtype=torch.float64) * 22 - 11
    x2 = torch.linspace(-3, 3, 41, dtype=torch.float64)
    kinks = torch.stack([-7 - 2 * torch.tanh(-x2), x2], dim=1)  # where a log term's |.| is 0
    starts = torch.tensor([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0], [0.0, 0.0], [-7.5, -0.5],
                           [9.0, -1.0], [0.0, -8.3552]], dtype=torch.float64)  # fmt: skip
    return torch.cat([random, kinks, starts])


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_hand_written_jacobians_equal_autograd(toy, scale: float) -> None:
    problem, _, _ = toy
    x = _points()
    losses, jacobians = problem.toy_losses_and_jacobians(x, scale)
    torch.testing.assert_close(losses, problem.toy_losses(x, scale), rtol=0, atol=0)
    torch.testing.assert_close(jacobians, problem.autograd_jacobians(x, scale),
                               rtol=1e-9, atol=1e-10)  # fmt: skip


def test_pareto_point_of_the_average_loss(toy) -> None:
    """(0, -8.3552), which the CAGrad paper marks as the minimum of the average loss, is a
    stationary point of it: the two tasks' gradients cancel in x1 and vanish in x2."""
    problem, _, _ = toy
    x = torch.tensor([[0.0, problem.PARETO_X2]], dtype=torch.float64)
    _, jacobians = problem.toy_losses_and_jacobians(x)
    assert jacobians.sum(dim=1).abs().max() < 1e-3


def _short(trajectories, name: str, steps: int):
    setting = trajectories.SETTINGS[name]
    return type(setting)(**{**setting.__dict__, "steps": steps})


@pytest.mark.parametrize("method", ["CAGrad", "FAMO", "UW"])
def test_batched_driver_follows_the_library_training_step(toy, method: str) -> None:
    """The batched driver (one method object per start, decide/commit by hand, one Adam for
    the batch) takes the same steps as MultiTaskOptimizer with one Adam per start.

    Not from Nash-MTL's start (0, 0): there the x1 gradient is a near-cancellation whose sign
    is a matter of rounding, and Adam turns either sign into a full step (the two ways of
    computing the gradient go to mirror-image sides)."""
    _, trajectories, run = toy
    entries = run.method_registry.select([method], run.TOY_OPTIONS)
    setting = _short(trajectories, "cagrad", 150)
    batched = run.run_setting(setting, entries, 50, torch.float64)[method]
    wrapped = trajectories.run_wrapper(setting, method, entries[method], 50, torch.float64)
    assert batched.path == "batched" and wrapped.path == "wrapper"
    assert not batched.failure and not wrapped.failure
    torch.testing.assert_close(torch.tensor(batched.trajectory), torch.tensor(wrapped.trajectory),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_scale_invariant_method_ignores_the_loss_scale_and_the_mean_does_not(toy) -> None:
    """Nash-MTL's update does not depend on the losses' scales (Navon et al. 2022, the point
    of their toy run with loss 1 scaled by 0.1); the mean's does."""
    _, trajectories, run = toy
    entries = run.method_registry.select(["Mean", "NashMTL"], run.TOY_OPTIONS)
    ends = {}
    for scale in (1.0, 0.1):
        setting = _short(trajectories, "nashmtl", 300)
        setting = type(setting)(**{**setting.__dict__, "scale": scale})
        runs = run.run_setting(setting, entries, 100, torch.float64)
        ends[scale] = {name: torch.tensor(r.trajectory[-1]) for name, r in runs.items()}
    nash_gap = (ends[1.0]["NashMTL"] - ends[0.1]["NashMTL"]).abs().max()
    mean_gap = (ends[1.0]["Mean"] - ends[0.1]["Mean"]).abs().max()
    assert nash_gap < 1e-4 < 1e-2 < mean_gap


def test_cli_writes_results_figure_and_table(tmp_path: Path) -> None:
    command = [
        sys.executable, "benchmarks/toy/run.py", "--setting", "cagrad", "--steps", "200",
        "--record-every", "100", "--methods", "Mean", "MGDA", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)

    summary = json.loads((tmp_path / "cagrad.json").read_text())
    assert list(summary["methods"]) == ["Mean", "MGDA"]
    assert summary["steps_done"] == 200
    for result in summary["methods"].values():
        assert len(result["ends"]) == 3 and not result["failure"]
        assert result["seconds"] > 0
    rows = (tmp_path / "cagrad_trajectories.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 * 3  # header; 2 methods x 3 starts x steps 0, 100, 200
    assert (tmp_path / "toy_cagrad.png").stat().st_size > 10_000
    assert "| MGDA |" in (tmp_path / "toy_cagrad.md").read_text()
