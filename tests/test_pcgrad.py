"""The PCGrad wrapper: what it writes into .grad, its optimizer protocol, state and AMP."""

from __future__ import annotations

import copy

import pytest
import torch

import gradsurgery as gs
from gradsurgery import functional as F
from tests._models import DEVICES, MultiHead, batch, model_and_batch


def flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shared_parameters_get_the_surgery_and_heads_their_own_gradient(reduction, device):
    model, x, y = model_and_batch(device=device)
    opt = gs.PCGrad(
        torch.optim.SGD(model.parameters(), lr=0.1),
        reduction=reduction,
        generator=torch.Generator().manual_seed(7),
    )
    expected_body = F.pcgrad(
        gs.task_gradients(model.losses(x, y), model.body),
        generator=torch.Generator().manual_seed(7),
        reduction=reduction,
    )
    head_grads = [gs.task_gradients([model.losses(x, y)[i]], model.heads[i])[0] for i in range(3)]

    info = opt.pc_backward(model.losses(x, y))

    torch.testing.assert_close(flat_grads(model.body.parameters()), expected_body)
    for head, expected in zip(model.heads, head_grads, strict=True):
        # Only one task reaches a head: its mean over reaching tasks is its own gradient.
        torch.testing.assert_close(flat_grads(head.parameters()), expected)
    assert all(p.grad is None for p in model.unused.parameters())
    assert info.num_conflicts > 0, "the test batch is built to conflict"
    assert info.projections.any()


def test_explicit_shared_parameters_limit_the_surgery():
    model, x, y = model_and_batch()
    first_layer = model.body[0]
    opt = gs.PCGrad(
        torch.optim.SGD(model.parameters(), lr=0.1),
        shared_parameters=first_layer,
        generator=torch.Generator().manual_seed(1),
    )
    grads = gs.task_gradients(model.losses(x, y), first_layer)
    expected_first = F.pcgrad(grads, generator=torch.Generator().manual_seed(1))
    expected_second = gs.task_gradients(model.losses(x, y), model.body[2]).mean(0)

    opt.pc_backward(model.losses(x, y))

    torch.testing.assert_close(flat_grads(first_layer.parameters()), expected_first)
    torch.testing.assert_close(flat_grads(model.body[2].parameters()), expected_second)


def test_one_task_is_a_plain_backward():
    model, x, y = model_and_batch(num_tasks=1)
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.pc_backward(model.losses(x, y))
    surgered = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.zero_grad()
    model.losses(x, y)[0].backward()
    plain = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(surgered, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_accumulate_like_backward():
    model, x, y = model_and_batch()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    state = opt.state_dict()
    opt.pc_backward(model.losses(x, y))
    once = [p.grad.clone() for p in model.body.parameters()]
    opt.load_state_dict(state)  # same generator, same projection orders
    opt.pc_backward(model.losses(x, y))
    for g, p in zip(once, model.body.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_training_reduces_every_task_loss():
    model, x, y = model_and_batch()
    opt = gs.PCGrad(torch.optim.Adam(model.parameters(), lr=1e-2))
    before = [loss.item() for loss in model.losses(x, y)]
    for _ in range(30):
        opt.zero_grad()
        opt.pc_backward(model.losses(x, y))
        opt.step()
    after = [loss.item() for loss in model.losses(x, y)]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def train(model, opt, steps, start_seed):
    for step in range(steps):
        x, y = batch(seed=start_seed + step)
        opt.zero_grad()
        opt.pc_backward(model.losses(x, y))
        opt.step()


def test_state_dict_round_trip_resumes_bit_for_bit():
    model, _, _ = model_and_batch()
    opt = gs.PCGrad(torch.optim.Adam(model.parameters(), lr=1e-2))
    train(model, opt, steps=3, start_seed=0)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # Adam's state tensors change in place
    train(model, opt, steps=4, start_seed=3)

    resumed = MultiHead()
    resumed.load_state_dict(saved_model)
    resumed_opt = gs.PCGrad(
        torch.optim.Adam(resumed.parameters(), lr=1e-2),
        generator=torch.Generator().manual_seed(12345),  # overwritten by the state
    )
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, steps=4, start_seed=3)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_opt.conflict_stats.steps == opt.conflict_stats.steps == 7
    assert torch.equal(resumed_opt.conflict_stats.pair_conflicts, opt.conflict_stats.pair_conflicts)


def test_behaves_as_a_torch_optimizer():
    model, x, y = model_and_batch()
    inner = torch.optim.SGD(model.body.parameters(), lr=0.5)
    opt = gs.PCGrad(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    opt.add_param_group({"params": list(model.heads.parameters())})
    assert len(inner.param_groups) == 2
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    opt.pc_backward(model.losses(x, y))
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.25
    assert all(p.grad is not None for p in model.heads.parameters())


def test_info_and_running_statistics_agree():
    model, x, y = model_and_batch()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.0))
    infos = []
    for _ in range(3):
        opt.zero_grad()
        infos.append(opt.pc_backward(model.losses(x, y)))
    info = infos[-1]
    negatives = int(torch.triu(info.cosine < 0, diagonal=1).sum())
    assert info.num_conflicts == negatives
    assert info.conflict_rate == pytest.approx(negatives / 3)
    assert torch.allclose(info.cosine, info.cosine.T)
    assert torch.allclose(info.cosine.diagonal(), torch.ones(3, dtype=info.cosine.dtype))
    # projections only ever happen against a conflicting partner
    assert not (info.projections & (info.cosine >= 0)).any()
    stats = opt.conflict_stats
    assert stats.steps == 3
    assert stats.conflicting_pairs == sum(i.num_conflicts for i in infos)
    assert stats.conflict_rate == pytest.approx(stats.conflicting_pairs / 9)
    assert torch.equal(stats.pair_conflicts, stats.pair_conflicts.T)


def test_nonfinite_skip_leaves_everything_and_skips_the_step():
    model, x, y = model_and_batch()
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = model.losses(x, y)
    losses[1] = losses[1] * float("nan")
    info = opt.pc_backward(losses)
    assert info.skipped and info.nonfinite_tasks == (1,)
    opt.step()  # skipped
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert opt.conflict_stats.steps == 0


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_gives_the_unscaled_update(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    reference = MultiHead(dtype=torch.float32).to(device)
    reference.load_state_dict(model.state_dict())
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = gs.PCGrad(torch.optim.SGD(reference.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)

    opt.pc_backward(model.losses(x, y), grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    ref_opt.pc_backward(reference.losses(x, y))
    ref_opt.step()

    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_overflow_is_skipped_by_the_scaler(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    largest = torch.finfo(torch.float32).max
    scaler = torch.amp.GradScaler(device, init_scale=largest)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = [100 * loss for loss in model.losses(x, y)]  # scaled, these overflow to inf
    info = opt.pc_backward(losses, grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert info.skipped
    assert scaler.get_scale() < largest
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    opt = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.autocast(device, dtype=torch.bfloat16):
        losses = model.losses(x, y)
    info = opt.pc_backward(losses)
    bf16 = [p.grad.clone() for p in model.body.parameters()]
    opt.zero_grad()
    fresh = gs.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    fresh.pc_backward(model.losses(x, y))
    assert all(g.dtype == torch.float32 for g in bf16)
    assert torch.isfinite(info.grad_norms).all()
    for a, p in zip(bf16, model.body.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=0.1, atol=0.02)
