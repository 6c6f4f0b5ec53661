"""examples/lightning/train.py: gradsurgery inside a LightningModule, on the CPU.

The Lightning run takes the same steps as a plain loop with the same method, and a run resumed
from Lightning's checkpoint ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import lightning as L  # the lightning extra (in dev): CI runs these tests
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gradsurgery as gs

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "lightning" / "train.py"
METHODS = ["pcgrad", "gradnorm"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        yield


def loader(example):
    return DataLoader(example.MultiTaskData(size=96, seed=0), batch_size=32)  # 3 steps an epoch


def fit(example, root, method, epochs, resume=None):
    L.seed_everything(0, verbose=False)
    model = example.MultiTaskRegression(method=method, seed=0)
    trainer = example.make_trainer(
        epochs,
        str(root),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(example), ckpt_path=resume)
    return model, trainer


def method_state(model, trainer):
    if model.gradnorm is not None:
        return model.gradnorm.state_dict()
    return trainer.optimizers[0].state_dict()


def assert_same(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("method", METHODS)
def test_lightning_steps_equal_a_plain_loop(example, tmp_path, method):
    model, trainer = fit(example, tmp_path, method, epochs=2)
    assert trainer.global_step == 6

    # The same model, data and method, without Lightning.
    torch.manual_seed(0)
    L.seed_everything(0, verbose=False)
    plain = example.MultiTaskRegression(method=method, seed=0)
    optimizer = plain.configure_optimizers()
    for _ in range(2):
        for x, y in loader(example):
            sizes = [x.shape[0]] * example.NUM_TASKS
            with plain.engine.record(sizes):
                out = plain.net(x.transpose(0, 1).reshape(-1, example.FEATURES))
            losses = [F.mse_loss(rows[:, t], y[:, t]) for t, rows in enumerate(out.split(sizes))]
            optimizer.zero_grad()
            if plain.gradnorm is not None:
                plain.gradnorm.backward(losses)
            else:
                optimizer.backward(losses)
            optimizer.step()

    for name, parameter in plain.net.named_parameters():
        assert torch.equal(parameter, model.net.get_parameter(name)), name
    first = next(plain.parameters())
    assert not torch.equal(first, example.MultiTaskRegression(method=method).net[0].weight)
    if method == "pcgrad":
        assert optimizer.conflict_stats.steps == 6
        assert optimizer.conflict_stats.conflicting_pairs > 0  # the orders matter


@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_continues_exactly(example, tmp_path, method):
    whole, whole_trainer = fit(example, tmp_path / "whole", method, epochs=4)

    fit(example, tmp_path / "first", method, epochs=2)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    resumed, resumed_trainer = fit(example, tmp_path / "resumed", method, 4, resume=checkpoint)

    assert resumed_trainer.global_step == whole_trainer.global_step == 12
    for name, parameter in whole.net.named_parameters():
        assert torch.equal(parameter, resumed.net.get_parameter(name)), name
    assert_same(method_state(whole, whole_trainer), method_state(resumed, resumed_trainer))


def test_pcgrad_state_is_in_lightnings_checkpoint(example, tmp_path):
    _, trainer = fit(example, tmp_path, "pcgrad", epochs=1)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    restored = gs.PCGrad(torch.optim.Adam(example.MultiTaskRegression().parameters()))
    restored.load_state_dict(saved["optimizer_states"][0])
    assert_same(restored.state_dict(), trainer.optimizers[0].state_dict())
