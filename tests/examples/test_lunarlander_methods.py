"""Every method is one call: the optimizer wrapped with the method named by the config,
through gradsurgery's public API; the study's updates are unchanged by it."""

import copy

import pytest
import torch
from config import make_config
from methods import make_method, method_classes
from networks import make_network

import gradsurgery as gs


def batch(cfg, seed=0):
    torch.manual_seed(seed)
    q_net = make_network(cfg)
    obs, task_ids = torch.randn(12, 8), torch.arange(3).repeat_interleave(4)
    return q_net, obs, task_ids


def task_losses(q_net, obs, task_ids):
    q = q_net(obs, task_ids)
    targets = torch.linspace(-1, 1, q.shape[0])[:, None]
    return (q - targets).pow(2).mean(dim=1).view(3, -1).mean(dim=1)  # [3], as td_losses


@pytest.mark.parametrize(
    "name, method_class, hyper",
    [
        ("shared-aware", gs.methods.Mean, {}),
        ("pcgrad-blind-sum", gs.methods.PCGrad, {"reduction": "sum"}),
        ("gradnorm-blind-alpha0.5", gs.methods.GradNorm, {"alpha": 0.5, "lr": 0.01}),
    ],
)
def test_the_wrapper_is_built_from_the_method_name(name, method_class, hyper):
    cfg = make_config(name)
    q_net, _, _ = batch(cfg)
    method = make_method(cfg, q_net)
    assert isinstance(method.optimizer, gs.MultiTaskOptimizer)
    assert type(method.optimizer.method) is method_class
    for key, value in hyper.items():
        assert getattr(method.optimizer.method, key) == value
    # Only methods that read per-task gradients get the batch-partition engine.
    assert (method.engine is None) == (method_class is gs.methods.Mean)
    assert method_classes()[cfg.method] is method_class


def test_mean_is_bit_identical_to_one_backward_of_the_mean():
    cfg = make_config("shared-aware")
    q_net, obs, task_ids = batch(cfg)
    task_losses(q_net, obs, task_ids).mean().backward()
    expected = [p.grad.clone() for p in q_net.parameters()]
    method = make_method(cfg, q_net)
    method.optimizer.zero_grad()
    method.optimizer.backward(list(task_losses(q_net, obs, task_ids)))
    for p, g in zip(q_net.parameters(), expected, strict=True):
        assert torch.equal(p.grad, g)


def test_gradnorm_balances_the_configured_layer_only():
    cfg = make_config("gradnorm-blind")
    q_net, obs, task_ids = batch(cfg)
    method = make_method(cfg, q_net)
    with method.recording(4):
        losses = task_losses(q_net, obs, task_ids)
    method.optimizer.zero_grad()
    info = method.optimizer.backward(list(losses))
    assert isinstance(info, gs.GradNormInfo)
    assert float(info.weights.sum()) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"'fc9' is not a layer.*fc1, fc2, fc3"):
        make_method(make_config("gradnorm-blind", gradnorm_layer="fc9"), q_net)


def test_a_resumed_wrapper_continues_bit_for_bit():
    cfg = make_config("pcgrad-aware")
    q_net, obs, task_ids = batch(cfg)
    copy_net = copy.deepcopy(q_net)  # one engine per network: each records its own passes

    def step(m, net):
        with m.recording(4):
            losses = task_losses(net, obs, task_ids)
        m.optimizer.zero_grad()
        m.optimizer.backward(list(losses))
        return [p.grad.clone() for p in net.parameters()]

    method = make_method(cfg, q_net)
    step(method, q_net)  # draws from PCGrad's generator
    again = make_method(cfg, copy_net)
    again.load_state_dict(method.state_dict())
    for a, b in zip(step(method, q_net), step(again, copy_net), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["shared-aware", "pcgrad-blind", "gradnorm-blind"])
def test_checkpoints_of_the_earlier_layout_still_resume(name):
    """Earlier versions saved {optimizer: Adam's or PCGrad's state, gradnorm: GradNorm's}."""
    cfg = make_config(name)
    q_net, obs, task_ids = batch(cfg)
    copy_net = copy.deepcopy(q_net)

    def step(m, net):
        with m.recording(4):
            losses = task_losses(net, obs, task_ids)
        m.optimizer.zero_grad()
        m.optimizer.backward(list(losses))
        m.optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    method = make_method(cfg, q_net)
    step(method, q_net)
    wrapper = method.optimizer
    if cfg.method == "pcgrad":
        earlier = dict(optimizer=wrapper.state_dict(), gradnorm=None)
    else:
        gradnorm = wrapper.method.state_dict() if cfg.method == "gradnorm" else None
        earlier = dict(optimizer=wrapper.optimizer.state_dict(), gradnorm=gradnorm)
    copy_net.load_state_dict(q_net.state_dict())
    again = make_method(cfg, copy_net)
    again.load_state_dict(copy.deepcopy(earlier))  # as read from disk: no shared tensors
    for a, b in zip(step(method, q_net), step(again, copy_net), strict=True):
        assert torch.equal(a, b)
