"""GradNorm: the weights' invariants, the analytic gradient, and the one-forward backward."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import gradsurgery as gs
from gradsurgery import functional as F
from gradsurgery.methods._adam import Adam as _Adam
from tests._models import DEVICES, MultiHead, batch, model_and_batch


class TwoForwardGradNorm:
    """The reference study's GradNorm, written plainly: double backward and a second forward.

    G_i is differentiated through the network with ``create_graph=True``; after the weight
    step, the losses are recomputed by a second forward pass and backpropagated with the new
    weights.
    """

    def __init__(self, num_tasks: int, shared, alpha: float, lr: float) -> None:
        self.num_tasks, self.shared, self.alpha = num_tasks, list(shared), alpha
        self.log_w = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_w], lr=lr)
        self.initial = None

    def weights(self):
        return self.num_tasks * torch.softmax(self.log_w, dim=0)

    def step(self, model, x, y) -> None:
        losses = model.losses(x, y)
        w = self.weights()
        norms = []
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(w[i] * loss, self.shared, create_graph=True)
            norms.append(torch.cat([g.flatten() for g in grads]).norm())
        G = torch.stack(norms)
        values = torch.stack(losses).detach()
        if self.initial is None:
            self.initial = values
        ratios = values / self.initial
        target = (G.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        gradnorm_loss = (G - target).abs().sum()
        self.optimizer.zero_grad()
        (self.log_w.grad,) = torch.autograd.grad(gradnorm_loss, [self.log_w])
        self.optimizer.step()
        # second forward pass, then the weighted backward with the new weights
        w = self.weights().detach()
        sum(w[i] * loss for i, loss in enumerate(model.losses(x, y))).backward()


def make_gradnorm(model, **kwargs):
    return gs.GradNorm(num_tasks=3, shared_parameters=model.body[2], **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_equals_the_two_forward_reference(device):
    model, _, _ = model_and_batch(device=device)
    reference = MultiHead().to(device)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    gn = make_gradnorm(model, alpha=1.5, lr=0.05)
    ref = TwoForwardGradNorm(3, reference.body[2].parameters(), alpha=1.5, lr=0.05)
    for step in range(8):
        x, y = batch(seed=step, device=device)
        opt.zero_grad()
        gn.backward(model.losses(x, y))
        opt.step()
        ref_opt.zero_grad()
        ref.step(reference, x, y)
        ref_opt.step()
        torch.testing.assert_close(gn.weights, ref.weights().detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(gn.weights, torch.ones(3, dtype=torch.float64)), "weights moved"


def test_backward_writes_the_weighted_gradient_with_the_new_weights():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model)
    info = gn.backward(model.losses(x, y))
    grads = gs.task_gradients(model.losses(x, y), list(model.parameters()))
    expected = info.weights.to(grads) @ grads
    written = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
            for p in model.parameters()
        ]
    )
    torch.testing.assert_close(written, expected)
    torch.testing.assert_close(info.weights, gn.weights)


def test_update_weights_never_touches_the_network_gradients():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model)
    losses = model.losses(x, y)
    before = gn.weights
    gn.update_weights(losses)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(before, gn.weights)
    sum(losses).backward()  # the graph is still there for the caller


@pytest.mark.parametrize("parametrization", ["softmax", "renormalize"])
@given(
    steps=st.integers(1, 25),
    alpha=st.floats(0, 3),
    lr=st.sampled_from([1e-3, 0.05, 0.5]),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
)
def test_weights_stay_positive_and_sum_to_num_tasks(parametrization, steps, alpha, lr, scales):
    model, _, _ = model_and_batch()
    gn = make_gradnorm(model, alpha=alpha, lr=lr, parametrization=parametrization)
    for step in range(steps):
        x, y = batch(seed=step)
        losses = [s * loss for s, loss in zip(scales, model.losses(x, y), strict=True)]
        gn.update_weights(losses)
        assert (gn.weights > 0).all()
        torch.testing.assert_close(gn.weights.sum(), torch.tensor(3.0, dtype=torch.float64))


def test_alpha_zero_makes_every_target_the_mean_norm():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model, alpha=0.0)
    gn.update_weights(model.losses(x, y))
    info = gn.update_weights([2 * loss for loss in model.losses(x, *batch(seed=1)[1:])])
    torch.testing.assert_close(
        info.targets, info.weighted_grad_norms.mean().expand(3), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("alpha", [0.5, 1.5, 3.0])
def test_the_update_s_targets_are_the_functional_targets(alpha):
    # GradNorm computes its targets on Python floats; functional.gradnorm_targets on tensors.
    model, x, y = model_and_batch()
    gn = make_gradnorm(model, alpha=alpha)
    gn.update_weights(model.losses(x, y))
    info = gn.update_weights([(k + 1) * loss for k, loss in enumerate(model.losses(x, y))])
    expected = F.gradnorm_targets(info.weighted_grad_norms, info.loss_ratios, alpha)
    torch.testing.assert_close(info.targets, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(info.targets, info.targets.mean().expand(3)), "ratios differ"


def test_gradient_on_log_weights_matches_finite_differences():
    """The analytic G_i = w_i ||grad_W L_i|| against G_i differentiated through the network."""
    model, x, y = model_and_batch()
    gn = make_gradnorm(model, alpha=1.5)
    gn.update_weights(model.losses(*batch(seed=5)))  # sets L(0) and moves the weights
    theta = gn.state_dict()["raw_weights"]
    info = gn.update_weights(model.losses(x, y))
    analytic = info.weight_gradient

    shared = list(model.body[2].parameters())

    def gradnorm_loss(theta):
        w = 3 * torch.softmax(theta, dim=0)
        norms = []
        for i, loss in enumerate(model.losses(x, y)):
            grads = torch.autograd.grad(w[i] * loss, shared, retain_graph=True)
            norms.append(torch.cat([g.flatten() for g in grads]).norm())
        return F.gradnorm_loss(torch.stack(norms), info.targets)

    eps = 1e-6
    numeric = torch.stack(
        [
            (gradnorm_loss(theta + eps * e) - gradnorm_loss(theta - eps * e)) / (2 * eps)
            for e in torch.eye(3, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_initial_losses_are_taken_at_the_first_update_and_reset_forgets_them():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model)
    first = gn.update_weights(model.losses(x, y))
    torch.testing.assert_close(first.loss_ratios, torch.ones(3, dtype=torch.float64))
    halved = gn.update_weights([loss / 2 for loss in model.losses(x, y)])
    torch.testing.assert_close(halved.loss_ratios, torch.full((3,), 0.5, dtype=torch.float64))
    gn.reset()
    again = gn.update_weights([loss / 2 for loss in model.losses(x, y)])
    torch.testing.assert_close(again.loss_ratios, torch.ones(3, dtype=torch.float64))


def test_slower_task_gets_more_weight():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model, alpha=1.5, lr=0.05)
    gn.update_weights(model.losses(x, y))
    for _ in range(20):  # task 0's loss stays at L(0), the others fall to a tenth
        losses = model.losses(x, y)
        gn.update_weights([losses[0], losses[1] / 10, losses[2] / 10])
    assert gn.weights[0] > gn.weights[1] and gn.weights[0] > gn.weights[2]


def test_state_dict_round_trip_continues_identically():
    model, _, _ = model_and_batch()
    gn = make_gradnorm(model, lr=0.05)
    for step in range(3):
        gn.update_weights(model.losses(*batch(seed=step)))
    saved = copy.deepcopy(gn.state_dict())
    for step in range(3, 6):
        gn.update_weights(model.losses(*batch(seed=step)))

    resumed = make_gradnorm(model, lr=0.05)
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        resumed.update_weights(model.losses(*batch(seed=step)))
    assert torch.equal(resumed.weights, gn.weights)
    assert torch.equal(resumed.initial_losses, gn.initial_losses)


@given(
    gradients=st.lists(
        st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=20
    ),
    lr=st.sampled_from([1e-3, 0.01, 0.5]),
)
def test_the_weights_adam_is_torch_adam(gradients, lr):
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([param], lr=lr)
    adam, values = _Adam(3, lr=lr), [0.0] * 3
    for gradient in gradients:
        param.grad = torch.tensor(gradient, dtype=torch.float64)
        reference.step()
        values, adam = adam.step(values, gradient)
        # The same operations in the same order; torch's kernels may fuse a multiply-add.
        torch.testing.assert_close(values, param.tolist(), rtol=1e-12, atol=1e-15)


def test_load_state_dict_checks_compatibility():
    model, _, _ = model_and_batch()
    state = make_gradnorm(model).state_dict()
    with pytest.raises(ValueError, match="parametrization"):
        make_gradnorm(model, parametrization="renormalize").load_state_dict(state)
    with pytest.raises(ValueError, match="task weights"):
        gs.GradNorm(2, model.body[2]).load_state_dict(state)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_gives_the_unscaled_update(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    reference = MultiHead(dtype=torch.float32).to(device)
    reference.load_state_dict(model.state_dict())
    gn, ref_gn = make_gradnorm(model), make_gradnorm(reference)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        gn.backward(model.losses(x, y), grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref_gn.backward(reference.losses(x, y))
        ref_opt.step()
    torch.testing.assert_close(gn.weights, ref_gn.weights)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_overflow_keeps_the_weights_and_is_skipped(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    gn = make_gradnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    largest = torch.finfo(torch.float32).max
    scaler = torch.amp.GradScaler(device, init_scale=largest)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = gn.backward([100 * loss for loss in model.losses(x, y)], grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert info.skipped
    assert torch.equal(gn.weights, torch.ones(3, dtype=torch.float64))
    assert gn.initial_losses is None
    assert scaler.get_scale() < largest
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast(device):
    model, x, y = model_and_batch(dtype=torch.float32, device=device)
    gn = make_gradnorm(model)
    with torch.autocast(device, dtype=torch.bfloat16):
        losses = model.losses(x, y)
    info = gn.backward(losses)
    assert torch.isfinite(info.grad_norms).all()
    assert all(p.grad.dtype == torch.float32 for p in model.body.parameters())


@pytest.mark.parametrize(
    ("first", "later", "match"),
    [
        ((1.0, 0.0, 1.0), None, r"positive losses.*task\(s\) 1 is 0"),  # L(0) = 0: no ratio
        ((1.0, 1.0, 1.0), (1.0, -0.5, 1.0), r"non-negative losses.*task\(s\) 1 is -0.5"),
    ],
)
def test_losses_without_a_loss_ratio_are_refused_and_change_nothing(first, later, match):
    model, x, y = model_and_batch()
    gn = make_gradnorm(model)
    losses = model.losses(x, y)

    def shifted(targets):  # the model's losses, moved to the given values
        return [loss - loss.detach() + value for loss, value in zip(losses, targets, strict=True)]

    if later is not None:
        gn.update_weights(shifted(first))
    before = (gn.weights, gn.initial_losses, repr(gn.state_dict()))
    with pytest.raises(ValueError, match=match):
        gn.update_weights(shifted(later if later is not None else first))
    assert torch.equal(gn.weights, before[0])
    assert (gn.initial_losses is None) == (before[1] is None)
    assert repr(gn.state_dict()) == before[2]


def test_a_later_zero_loss_is_accepted_and_every_loss_at_zero_gives_balanced_targets():
    model, x, y = model_and_batch()
    gn = make_gradnorm(model)
    losses = model.losses(x, y)
    gn.update_weights(losses)
    zero = [loss * 0 for loss in losses]
    info = gn.update_weights(zero)
    assert torch.isfinite(gn.weights).all()
    torch.testing.assert_close(info.targets, info.weighted_grad_norms.mean().expand(3))
