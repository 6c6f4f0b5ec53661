"""Every method is public twice: as ``gs.methods.Name`` and as the optimizer class ``gs.Name``."""

from __future__ import annotations

import pytest
import torch

import gradsurgery as gs

# GradNorm's public class is its stand-alone weighter (gs.GradNorm), not a wrapper class.
WRAPPED = [name for name in gs.methods.__all__ if name != "GradNorm"]
NEEDS_NUM_TASKS = {"UW", "IMTLL", "FAMO"}
REQUIRED = {"LinearScalarization": {"weights": [1.0, 2.0]}}


def test_every_method_is_exported_once_in_both_namespaces():
    assert len(set(gs.methods.__all__)) == len(gs.methods.__all__) == 23
    assert set(WRAPPED) <= set(gs.__all__)
    assert len(set(gs.__all__)) == len(gs.__all__)


@pytest.mark.parametrize("name", WRAPPED)
def test_the_optimizer_class_runs_its_method(name):
    wrapper_class = getattr(gs, name)
    assert issubclass(wrapper_class, gs.MultiTaskOptimizer)
    assert wrapper_class.method_class is getattr(gs.methods, name)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    options = dict(REQUIRED.get(name, {}))
    if name in NEEDS_NUM_TASKS:
        options["num_tasks"] = 2
    opt = wrapper_class(torch.optim.SGD(model.parameters(), lr=0.1), **options)
    assert isinstance(opt.method, wrapper_class.method_class)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(torch.randn(6, 3))
    opt.zero_grad()
    opt.backward([out[:, 0].pow(2).mean() + 0.1, (out[:, 1] - 1).pow(2).mean() + 0.1])
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
