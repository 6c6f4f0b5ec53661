"""Every method of the library runs in the study: a `--method` choice, a named configuration
on the task-blind network, and a few DQN updates that leave the network finite."""

import json

import numpy as np
import pytest
import torch
import train
from config import (
    CHOICES,
    CONFIGS,
    METHOD_CONFIGS,
    QUICK_OVERRIDES,
    Config,
    make_config,
)
from envs import NUM_TASKS, OBS_DIM
from methods import make_method
from networks import make_network
from replay import Batch
from runfiles import saved_config_differs

import gradsurgery as gs

# The methods whose blind configuration predates this list, and those that need weights or
# are the mean under another name.
WITHOUT_NEW_CONFIG = {"Mean", "PCGrad", "GradNorm", "LinearScalarization"}
BATCH = 16


def test_every_library_method_is_a_method_choice():
    assert set(CHOICES["method"]) == {name.lower() for name in gs.methods.__all__}
    args = train.parse_args(["--method", "mgda", "--config", "shared-blind"])
    assert args.method == "mgda"
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "no-such-method"])


def test_every_method_has_a_blind_configuration():
    expected = {f"{n.lower()}-blind" for n in gs.methods.__all__} - {
        f"{n.lower()}-blind" for n in WITHOUT_NEW_CONFIG
    }
    assert set(METHOD_CONFIGS) == expected
    for name in METHOD_CONFIGS:
        cfg = make_config(name)
        assert cfg.network == "blind" and f"{cfg.method}-blind" == name
        assert cfg.problems() == []
        # Everything but the method is the study's committed defaults.
        assert set(CONFIGS[name]) <= {"network", "method", "method_options"}


def random_batch(seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    n = NUM_TASKS * BATCH
    return Batch(
        obs=rng.standard_normal((n, OBS_DIM), dtype=np.float32),
        actions=rng.integers(0, 4, n),
        rewards=rng.uniform(-10, 10, n).astype(np.float32),
        next_obs=rng.standard_normal((n, OBS_DIM), dtype=np.float32),
        terminated=(rng.random(n) < 0.1).astype(np.float32),
    )


@pytest.mark.parametrize("name", [*METHOD_CONFIGS, "fixedweights-blind"])
def test_each_configuration_learns_a_few_steps(name):
    torch.set_num_threads(1)
    cfg = make_config(name, seed=3)
    torch.manual_seed(cfg.seed)
    q_net, target_net = make_network(cfg), make_network(cfg)
    target_net.load_state_dict(q_net.state_dict())
    method = make_method(cfg, q_net)
    method_class = gs.methods.__dict__[
        next(n for n in gs.methods.__all__ if n.lower() == cfg.method)
    ]
    assert type(method.optimizer.method) is method_class
    for key, value in cfg.method_keywords().items():  # the configured hyper-parameters
        configured = getattr(method.optimizer.method, key)
        assert (list(configured) if isinstance(configured, tuple) else configured) == value
    # Per-task gradients come from the batch-partition engine, loss weightings need none.
    assert (method.engine is None) == (method_class.needs == gs.Needs.LOSSES)

    before = [p.detach().clone() for p in q_net.parameters()]
    task_ids = torch.arange(NUM_TASKS).repeat_interleave(BATCH)
    logged = []
    rounds = 7  # past STCH's 4 warm-up epochs and its normalizer epoch
    for step in range(2 * rounds):
        with method.recording(BATCH):
            losses = train.td_losses(q_net, target_net, random_batch(step), task_ids, cfg)
        method.optimizer.zero_grad()
        info = method.optimizer.backward(list(losses))
        method.optimizer.step()
        logged.append(method.signals(info))
        if step % 2 == 1:  # two updates per round
            method.end_round(step // 2 + 1, step + 1)
    assert all(torch.isfinite(p).all() for p in q_net.parameters())
    assert any(not torch.equal(p, old) for p, old in zip(q_net.parameters(), before, strict=True))
    weights = [row for row in logged if row]  # every method here reports its task weights
    assert len(weights) == len(logged)
    assert all(np.isfinite(list(row.values())).all() for row in weights)
    if cfg.method == "stch":
        assert method.optimizer.method.normalizer is not None  # the warm-up has ended


def test_an_epoch_is_epoch_rounds_rounds_once_learning_has_started():
    cfg = make_config("dwa-blind", epoch_rounds=2)
    method = make_method(cfg, make_network(cfg))
    closed = []
    method.optimizer.method.end_epoch = lambda: closed.append(True)
    method.end_round(2, updates=0)  # no update yet: no epoch
    method.end_round(3, updates=10)  # not a multiple of 2
    assert closed == []
    method.end_round(4, updates=10)
    assert closed == [True]
    step_cfg = make_config("dwa-blind", method_options='{"window": "step"}')
    make_method(step_cfg, make_network(step_cfg)).end_round(1, updates=5)  # no epochs: no call


def test_method_options_are_checked_before_a_run():
    assert "no argument named d" in " ".join(
        make_config("cagrad-blind", method_options='{"d": 1}').problems()
    )
    assert "not JSON" in " ".join(make_config("mgda-blind", method_options="{c").problems())
    assert "not a JSON object" in " ".join(make_config("mgda-blind", method_options="1").problems())
    cfg = make_config("pcgrad-blind", method_options='{"reduction": "sum"}')
    with pytest.raises(ValueError, match="--pcgrad-reduction"):
        make_method(cfg, make_network(cfg))


def test_runs_from_before_the_new_fields_still_resume(tmp_path):
    cfg = make_config("shared-blind", runs_dir=str(tmp_path))
    saved = json.loads(cfg.to_json())
    del saved["method_options"], saved["epoch_rounds"]
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(saved))
    assert saved_config_differs(cfg, cfg.run_dir) == {}
    changed = make_config("shared-blind", runs_dir=str(tmp_path), epoch_rounds=2)
    assert saved_config_differs(changed, cfg.run_dir) == {"epoch_rounds": (1, 2)}
    assert Config.from_json(cfg.run_dir / "config.json") == cfg


@pytest.mark.parametrize("name", ["uw-blind", "dwa-blind"])
def test_a_short_run_writes_weights_and_update_times(name, tmp_path):
    cfg = make_config(
        name,
        runs_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        **{**QUICK_OVERRIDES, "episodes_per_task": 3, "eval_every": 3},
    )
    summary = train.train(cfg)
    assert summary["updates"] > 0
    assert summary["ms_per_update"] > 0
    assert summary["update_time_s"] < summary["wall_time_s"]
    episodes = (cfg.run_dir / "episodes.csv").read_text().splitlines()
    header = episodes[0].split(",")
    last = dict(zip(header, episodes[-1].split(","), strict=True))
    assert float(last["weight_standard"]) > 0


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in train() can catch it."""


@pytest.mark.parametrize("name", ["uw-blind", "dwa-blind", "famo-blind", "rlw-blind"])
def test_a_killed_run_resumes_bit_for_bit(name, tmp_path, monkeypatch):
    """Methods with state of their own (learned log-variances in the optimizer, DWA's epoch
    windows, FAMO's logits and their Adam, RLW's generator) continue as if never stopped."""

    def quick(folder):
        overrides = {**QUICK_OVERRIDES, "episodes_per_task": 5}
        return make_config(
            name, runs_dir=str(tmp_path / folder), progress=False, tensorboard=False, **overrides
        )

    def outputs(cfg):
        return {f: (cfg.run_dir / f).read_text() for f in ("episodes.csv", "eval.csv")}

    expected = quick("once")
    train.train(expected)
    cfg = quick("killed")
    calls = {"n": 0}
    save = train.save_atomic

    def save_then_die(obj, path):
        calls["n"] += 1
        if calls["n"] == 8:  # after episode 8, mid-way through the third round
            raise Killed
        save(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_atomic", save_then_die)
        with pytest.raises(Killed):
            train.train(cfg)
    train.train(cfg, resume=True)
    assert outputs(cfg) == outputs(expected)
