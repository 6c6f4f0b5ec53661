"""The target network follows the online one by the configured rule (hard copy every N
episodes, hard copy every N updates, soft Polyak update after every update)."""

import pytest
import torch
import train
from config import CONFIGS, QUICK_OVERRIDES, make_config
from networks import make_network


def nets(cfg):
    torch.manual_seed(0)
    q_net, target_net = make_network(cfg), make_network(cfg)
    target_net.requires_grad_(False)
    return q_net, target_net


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["episodes", "updates"])
def test_hard_copy_every_n_of_its_own_event_only(mode):
    cfg = make_config("shared-aware", target_update=mode, target_update_every=3)
    q_net, target_net = nets(cfg)
    before = params(target_net)
    other = "updates" if mode == "episodes" else "episodes"
    for count in range(1, 7):
        train.update_target(target_net, q_net, cfg, other, count)  # never copies
    assert same(params(target_net), before)
    for count in (1, 2):
        train.update_target(target_net, q_net, cfg, mode, count)
    assert same(params(target_net), before)
    train.update_target(target_net, q_net, cfg, mode, 3)
    assert same(params(target_net), params(q_net))


def test_soft_update_moves_tau_of_the_way_after_each_update_only():
    cfg = make_config("shared-aware", target_update="soft", target_tau=0.25)
    q_net, target_net = nets(cfg)
    before, online = params(target_net), params(q_net)
    train.update_target(target_net, q_net, cfg, "episodes", 10)  # episodes: no change
    assert same(params(target_net), before)
    train.update_target(target_net, q_net, cfg, "updates", 1)
    for new, old, q in zip(params(target_net), before, online, strict=True):
        torch.testing.assert_close(new, old + 0.25 * (q - old))
    assert same(params(q_net), online)  # the online network is left alone


def test_unknown_target_update_is_refused():
    cfg = make_config("shared-aware", target_update="polyak")
    q_net, target_net = nets(cfg)
    with pytest.raises(ValueError, match="target_update"):
        train.update_target(target_net, q_net, cfg, "updates", 1)


def test_default_is_the_committed_study():
    cfg = make_config("shared-aware")
    assert (cfg.target_update, cfg.target_update_every, cfg.update_every) == ("episodes", 10, 4)


@pytest.mark.parametrize(
    "overrides, target_equals_online",
    [
        (dict(target_update="soft", target_tau=1.0), True),  # tau 1: a copy per update
        (dict(target_update="soft", target_tau=1e-3), False),
        (dict(target_update="updates", target_update_every=1), True),
        (dict(target_update="updates", target_update_every=7, update_every=1), None),
    ],
)
def test_short_run_per_mode(tmp_path, overrides, target_equals_online):
    cfg = make_config(
        "shared-aware",
        seed=1,
        runs_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        **{**QUICK_OVERRIDES, "episodes_per_task": 2, **overrides},
    )
    summary = train.train(cfg)
    assert summary["updates"] > 0
    ckpt = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)
    q, target = ckpt["q_net"], ckpt["target_net"]
    equal = all(torch.equal(q[k], target[k]) for k in q)
    if target_equals_online is not None:
        assert equal == target_equals_online
    else:  # copied at the last multiple of 7 updates: equal only if that was the last one
        assert equal == (summary["updates"] % 7 == 0)


PILOT = ["shared-aware-soft", "shared-aware-learn1", "shared-aware-copy10u"]
READINGS = {"update_every", "target_update", "target_update_every", "target_tau"}


@pytest.mark.parametrize("name", ["gradnorm-blind", "pcgrad-blind"])
def test_soft_confirmations_are_the_method_under_the_soft_reading(name):
    method, soft = make_config(name), make_config(f"{name}-soft")
    changed = {k for k in READINGS | set(CONFIGS[name]) if getattr(soft, k) != getattr(method, k)}
    assert changed == {"target_update"}
    assert (soft.target_tau, soft.update_every) == (1e-3, 4)
    assert soft.method == method.method and soft.network == method.network


@pytest.mark.parametrize("name", PILOT)
def test_pilot_configurations_are_the_baseline_but_for_one_reading(name):
    baseline = make_config("shared-aware")
    cfg = make_config(name)
    changed = {k for k in CONFIGS[name] if getattr(cfg, k) != getattr(baseline, k)}
    assert changed and changed <= READINGS
