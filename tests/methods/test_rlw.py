"""RLW against torchjd's Random and LibMTL's draw on the same random numbers, the simplex, and
its generator: seedable, saved, and untouched by a step that is not committed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchjd.scalarization import Random

from gradsurgery._weighting import Needs
from gradsurgery.functional import rlw_weights
from gradsurgery.methods.rlw import RLW

from ._loss_weighting import assert_close, assert_resumes_bit_exactly, saved, step


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_agrees_with_torchjd_and_libmtl_on_the_same_draws(num_tasks):
    """torchjd's Random and LibMTL's RLW (LibMTL/weighting/RLW.py:
    ``F.softmax(torch.randn(task_num), dim=-1)``) both draw from the global generator; a private
    generator with the same seed gives the same stream."""
    method = RLW(generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    torchjd_weights = []
    for _ in range(5):
        values = torch.ones(num_tasks, requires_grad=True)
        (grad,) = torch.autograd.grad(Random()(values), values)
        torchjd_weights.append(grad.tolist())
    torch.manual_seed(7)
    libmtl_weights = [F.softmax(torch.randn(num_tasks), dim=-1).tolist() for _ in range(5)]
    for theirs, libmtl in zip(torchjd_weights, libmtl_weights, strict=True):
        ours = step(method, [1.0] * num_tasks)
        assert_close(ours, theirs, rtol=1e-6)  # their softmax runs in float32
        assert_close(ours, libmtl, rtol=1e-6)


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
@pytest.mark.parametrize("num_tasks", [1, 2, 10])
def test_weights_lie_on_the_simplex(distribution, num_tasks):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        weights = rlw_weights(num_tasks, distribution, generator=generator)
        assert (weights > 0).all()
        assert float(weights.sum()) == pytest.approx(1.0, rel=1e-14)


def test_dirichlet_is_uniform_on_the_simplex():
    """Dirichlet(1, 1, 1): each weight has mean 1/3 and variance (1/3)(2/3)/4 = 1/18."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([rlw_weights(3, "dirichlet", generator=generator) for _ in range(4000)])
    assert_close(draws.mean(0).tolist(), [1 / 3] * 3, rtol=0, atol=0.02)
    assert_close(draws.var(0).tolist(), [1 / 18] * 3, rtol=0, atol=0.01)


def test_every_step_draws_afresh():
    method = RLW(generator=torch.Generator().manual_seed(3))
    assert method.needs is Needs.LOSSES
    first = step(method, [1.0, 1.0])
    assert step(method, [1.0, 1.0]) != first


def test_a_step_refused_after_the_draw_leaves_the_generator_alone():
    """The pipeline refuses a gradient that is not finite after the method drew its weights:
    the generator is put back, so the next step draws what this one drew."""
    import gradsurgery as gs

    method = RLW(generator=torch.Generator().manual_seed(3))
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = gs.MultiTaskOptimizer(torch.optim.SGD([p], lr=0.1), method)
    state = method.generator.get_state()
    with pytest.raises(ValueError):
        optimizer.backward([p.sum().sqrt(), p.sum()])  # sqrt at 0: a finite loss, an Inf gradient
    assert torch.equal(method.generator.get_state(), state)


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_resumes_bit_exactly(distribution):
    def build():
        return RLW(distribution, generator=torch.Generator().manual_seed(1))

    assert_resumes_bit_exactly(build, [[1.0, 2.0, 3.0]] * 8, at=3)


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    method = RLW(generator=torch.Generator().manual_seed(0))
    before = saved(method)["generator"]
    for state in ({}, {"generator": torch.zeros(3, dtype=torch.uint8)}, {"generator": 1, "x": 2}):
        with pytest.raises(ValueError):
            method.load_state_dict(state)
        assert torch.equal(method.generator.get_state(), before)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="distribution"):
        RLW("bernoulli")
    with pytest.raises(ValueError, match="num_tasks"):
        rlw_weights(0)
    with pytest.raises(ValueError, match="generator"):
        RLW(generator="seed")
