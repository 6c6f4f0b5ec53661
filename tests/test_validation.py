"""Every bad input raises an error that names the problem, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import gradsurgery as gs
from tests._models import DEVICES, assert_same_snapshot, model_and_batch, snapshot


def bad_losses(case: str, model, x, y) -> list:
    losses = model.losses(x, y)
    if case == "empty":
        return []
    if case == "non-scalar":
        twice = torch.ones(2, dtype=losses[1].dtype, device=losses[1].device)
        return [losses[0], losses[1] * twice, losses[2]]
    if case == "no-grad":
        return [losses[0], losses[1].detach(), losses[2]]
    if case == "wrong-count":
        return losses[:2]
    if case == "not-a-tensor":
        return [losses[0], 1.0, losses[2]]
    if case == "nan-loss":
        return [losses[0], losses[1] * float("nan"), losses[2]]
    if case == "inf-loss":
        return [losses[0], losses[1], losses[2] + float("inf")]
    if case == "nan-gradient":
        # value 0, gradient 0 * d sqrt(0) = NaN
        kink = (model.body[2].weight * 0).sqrt().sum()
        return [losses[0], losses[1] + kink, losses[2]]
    if case == "different-devices":
        meta = torch.zeros((), device="meta", dtype=losses[2].dtype, requires_grad=True) * 1
        return [losses[0], losses[1], meta]
    if case == "unrelated":
        stray = torch.ones(3, dtype=x.dtype, requires_grad=True)
        return [(stray * k).sum() for k in range(3)]
    raise AssertionError(case)


CASES = {
    "empty": "empty",
    "non-scalar": r"task 1 is not a scalar",
    "no-grad": r"task 1 does not require grad",
    "wrong-count": r"expected 3 losses",
    "not-a-tensor": r"task 1 is a float",
    "nan-loss": r"loss of task\(s\) 1 holds NaN",
    "inf-loss": r"loss of task\(s\) 2 holds NaN or Inf",
    "nan-gradient": r"gradient of task\(s\) 1 holds NaN",
    "different-devices": r"different devices",
}


def pcgrad_setup(device="cpu"):
    model, x, y = model_and_batch(device=device)
    opt = gs.PCGrad(torch.optim.Adam(model.parameters(), lr=1e-2), num_tasks=3)
    opt.pc_backward(model.losses(x, y))  # some optimizer state and .grad to protect
    opt.step()
    return model, x, y, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_pcgrad_bad_input_raises_and_changes_nothing(case, device):
    model, x, y, opt = pcgrad_setup(device)
    before = snapshot(model, opt)
    generator_state = opt.generator.get_state()
    stats = copy.deepcopy(vars(opt.conflict_stats))
    with pytest.raises((ValueError, TypeError), match=CASES[case]):
        opt.pc_backward(bad_losses(case, model, x, y))
    assert_same_snapshot(before, snapshot(model, opt))
    assert torch.equal(opt.generator.get_state(), generator_state)
    assert {k: v for k, v in vars(opt.conflict_stats).items() if k != "pair_conflicts"} == {
        k: v for k, v in stats.items() if k != "pair_conflicts"
    }
    assert torch.equal(opt.conflict_stats.pair_conflicts, stats["pair_conflicts"])


def test_pcgrad_losses_that_reach_no_parameter():
    model, x, y, opt = pcgrad_setup()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="no parameter of the wrapped optimizer is reached"):
        opt.pc_backward(bad_losses("unrelated", model, x, y))
    assert_same_snapshot(before, snapshot(model, opt))


def gradnorm_setup(device="cpu"):
    model, x, y = model_and_batch(device=device)
    gn = gs.GradNorm(3, model.body[2].parameters(), lr=0.05)
    gn.backward(model.losses(x, y))  # weights, L(0) and .grad to protect
    return model, x, y, gn


@pytest.mark.parametrize("method", ["backward", "update_weights"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradnorm_bad_input_raises_and_changes_nothing(case, method, device):
    model, x, y, gn = gradnorm_setup(device)
    before = snapshot(model)
    state = copy.deepcopy(gn.state_dict())
    with pytest.raises((ValueError, TypeError), match=CASES[case]):
        getattr(gn, method)(bad_losses(case, model, x, y))
    assert_same_snapshot(before, snapshot(model))
    after = gn.state_dict()
    assert torch.equal(after["raw_weights"], state["raw_weights"])
    assert torch.equal(after["initial_losses"], state["initial_losses"])
    assert repr(after["optimizer"]) == repr(state["optimizer"])


def test_gradnorm_loss_that_misses_the_shared_layer():
    model, x, y, gn = gradnorm_setup()
    with pytest.raises(ValueError, match=r"task\(s\) 0, 1, 2 does not depend on the shared"):
        gn.backward(bad_losses("unrelated", model, x, y))


def test_gradnorm_nonfinite_in_a_non_shared_parameter_rolls_back():
    model, x, y, gn = gradnorm_setup()
    before = snapshot(model)
    state = copy.deepcopy(gn.state_dict())
    losses = model.losses(x, y)
    losses[0] = losses[0] + (model.body[0].weight * 0).sqrt().sum()  # NaN below the shared layer
    with pytest.raises(gs.NonFiniteError, match="weighted gradient"):
        gn.backward(losses)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(gn.state_dict()["raw_weights"], state["raw_weights"])
    assert repr(gn.state_dict()["optimizer"]) == repr(state["optimizer"])


def test_gradnorm_skip_policy_reports_and_changes_nothing():
    model, x, y = model_and_batch()
    gn = gs.GradNorm(3, model.body[2], nonfinite="skip")
    losses = bad_losses("nan-gradient", model, x, y)
    info = gn.backward(losses)
    assert info.skipped and info.nonfinite_tasks == (1,)
    assert gn.initial_losses is None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: gs.PCGrad(m), "torch.optim.Optimizer"),
        (lambda m: gs.PCGrad(torch.optim.SGD(m.parameters()), reduction="max"), "reduction"),
        (lambda m: gs.PCGrad(torch.optim.SGD(m.parameters()), nonfinite="warn"), "nonfinite"),
        (lambda m: gs.PCGrad(torch.optim.SGD(m.parameters()), num_tasks=0), "num_tasks"),
        (lambda m: gs.GradNorm(0, m.body), "num_tasks"),
        (lambda m: gs.GradNorm(3, []), "shared_parameters is empty"),
        (lambda m: gs.GradNorm(3, m.body, alpha=-1), "alpha"),
        (lambda m: gs.GradNorm(3, m.body, parametrization="exp"), "parametrization"),
    ],
)
def test_bad_constructor_arguments(make, message):
    model, _, _ = model_and_batch()
    with pytest.raises((TypeError, ValueError), match=message):
        make(model)
