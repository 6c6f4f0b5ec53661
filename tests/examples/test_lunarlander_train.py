"""End to end: the `--quick` study of every configuration, through the real CLI."""

import csv
import json

import numpy as np
import pytest
import torch
import train
from config import CONFIGS, QUICK_OVERRIDES, STUDY_CONFIGS, Config, make_config
from envs import TASK_NAMES


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """`train.py --quick`: all seven configurations in parallel processes, then the report."""
    runs_dir = tmp_path_factory.mktemp("runs")
    summaries = train.main(
        ["--quick", "--runs-dir", str(runs_dir), "--workers", "2", "--no-tensorboard"]
    )
    return runs_dir, summaries


def test_quick_runs_every_configuration(quick_study):
    runs_dir, summaries = quick_study
    assert sorted(s["config_name"] for s in summaries) == sorted(STUDY_CONFIGS)
    assert len(STUDY_CONFIGS) == 7
    report = (runs_dir / "results.md").read_text()
    for name in STUDY_CONFIGS:
        assert f"| {name} | 1 |" in report
    for png in ("learning_curves", "training_curves", "gradnorm_weights", "pcgrad_conflicts"):
        assert (runs_dir / f"{png}.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_quick_run_outputs(quick_study, name):
    run_dir = quick_study[0] / name / "seed-0"
    cfg = Config.from_json(run_dir / "config.json")
    assert cfg == make_config(
        name, seed=0, runs_dir=str(quick_study[0]), tensorboard=False, **QUICK_OVERRIDES
    )
    episodes = read_rows(run_dir / "episodes.csv")
    assert len(episodes) == 3 * cfg.episodes_per_task
    assert [r["task"] for r in episodes[:6]] == [*TASK_NAMES, *TASK_NAMES]  # round robin
    assert [int(r["task_episode"]) for r in episodes[:6]] == [0, 0, 0, 1, 1, 1]
    assert float(episodes[1]["epsilon"]) == pytest.approx(cfg.epsilon_decay)
    assert all(int(r["length"]) <= cfg.max_episode_steps for r in episodes)
    updates = [int(r["updates"]) for r in episodes]
    assert updates[0] == 0 and sum(updates) > 20  # warm-up first, then learning
    learned = [r for r in episodes if int(r["updates"]) > 0]
    assert all(np.isfinite(float(r["loss"])) for r in learned)
    signals = {"pcgrad": "conflict_rate", "gradnorm": "weight_heavy"}
    for method, column in signals.items():
        if cfg.method == method:
            values = [float(r[column]) for r in learned]
            assert all(np.isfinite(values))
        else:
            assert all(r[column] == "" for r in episodes)
    if cfg.method == "pcgrad":
        assert all(0 <= float(r["conflict_rate"]) <= 1 for r in learned)
        assert all(-1 <= float(r["cos_standard_windy"]) <= 1 for r in learned)
    if cfg.method == "gradnorm":
        weights = [sum(float(r[f"weight_{t}"]) for t in TASK_NAMES) for r in learned]
        assert np.allclose(weights, 3.0, atol=0.05)  # GradNorm keeps sum(w) = num tasks

    evals = read_rows(run_dir / "eval.csv")
    periodic = [r for r in evals if r["phase"] == "periodic"]
    final = [r for r in evals if r["phase"] == "final"]
    assert len(periodic) == 3 * cfg.eval_episodes  # at 2 of 4 episodes per task
    assert len(final) == 3 * cfg.final_eval_episodes
    assert [int(r["seed"]) for r in final[: cfg.final_eval_episodes]] == [
        cfg.eval_seed + i for i in range(cfg.final_eval_episodes)
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    returns = [float(r["return"]) for r in final]
    assert summary["final_return_avg"] == pytest.approx(np.mean(returns))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["finished"] and ckpt["state"]["episode"] == len(episodes)


def test_same_seed_same_episodes(tmp_path):
    paths = []
    for attempt in ("a", "b"):
        cfg = make_config(
            "pcgrad-aware",
            seed=1,
            runs_dir=str(tmp_path / attempt),
            progress=False,
            tensorboard=False,
            **QUICK_OVERRIDES,
        )
        train.train(cfg)
        paths.append(cfg.run_dir)
    for name in ("episodes.csv", "eval.csv"):
        assert (paths[0] / name).read_text() == (paths[1] / name).read_text()
    other = make_config(
        "pcgrad-aware",
        seed=2,
        runs_dir=str(tmp_path / "c"),
        progress=False,
        tensorboard=False,
        **QUICK_OVERRIDES,
    )
    train.train(other)
    assert (other.run_dir / "episodes.csv").read_text() != (paths[0] / "episodes.csv").read_text()


def test_time_outs_are_stored_as_truncation(tmp_path):
    """Only real ends (crash/landing) are terminal in replay, never a time-out."""
    cfg = make_config(
        "shared-blind",
        runs_dir=str(tmp_path),
        progress=False,
        tensorboard=False,
        **{**QUICK_OVERRIDES, "max_episode_steps": 75},
    )
    train.train(cfg)
    episodes = read_rows(cfg.run_dir / "episodes.csv")
    ended = sum(int(r["length"]) < 75 for r in episodes)
    timed_out = sum(int(r["length"]) == 75 for r in episodes)
    assert ended > 0 and timed_out > 0  # both kinds of episode end happened
    buffer = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["buffer"]
    # A crash ends an episode before the limit; its last transition is the only terminal one.
    assert int(buffer["terminated"].sum()) == ended


def test_cli_has_a_flag_for_every_field(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for field in Config.__dataclass_fields__:
        if field not in ("config_name", "seed"):
            assert "--" + field.replace("_", "-") in help_text


def test_cli_overrides():
    args = train.parse_args(
        [
            "--config",
            "brc",
            "--seed",
            "3",
            "--episodes-per-task",
            "7",
            "--double-dqn",
            "--lr",
            "1e-3",
            "--loss",
            "huber",
        ]
    )
    assert args.config == ["brc"] and args.seed == [3]
    from config import overrides_from_args

    overrides = overrides_from_args(args, skip=("config_name", "seed"))
    assert overrides == dict(episodes_per_task=7, double_dqn=True, lr=1e-3, loss="huber")
    cfg = make_config("brc", seed=3, **overrides)
    assert cfg.lr == 1e-3 and cfg.weight_decay == 1e-4 and cfg.max_grad_norm == 10.0
    for overrides in CONFIGS.values():
        Config(**overrides)  # every named configuration only sets real fields
    with pytest.raises(KeyError):
        make_config("no-such-config")


@pytest.mark.parametrize("name", ["pcgrad-blind", "gradnorm-aware"])
def test_partition_engine_gives_the_same_updates(tmp_path, name):
    """`--engine partition` (one backward split by task) matches one backward per task."""
    runs = {}
    for engine in ("autograd", "partition"):
        cfg = make_config(
            name,
            engine=engine,
            runs_dir=str(tmp_path / engine),
            progress=False,
            tensorboard=False,
            **QUICK_OVERRIDES,
        )
        train.train(cfg)
        runs[engine] = read_rows(cfg.run_dir / "episodes.csv")
    first = next(i for i, r in enumerate(runs["autograd"]) if int(r["updates"]) > 0)
    for column in ("return", "loss", "loss_windy", "weight_heavy", "cos_standard_windy"):
        a, b = runs["autograd"][first][column], runs["partition"][first][column]
        assert (a == "") == (b == "")
        if a:
            assert float(b) == pytest.approx(float(a), rel=1e-4, abs=1e-6)


EXTRA_CONFIGS = sorted(set(CONFIGS) - set(STUDY_CONFIGS))


@pytest.mark.parametrize("name", EXTRA_CONFIGS)
def test_extra_configurations_run(tmp_path, name):
    cfg = make_config(
        name, runs_dir=str(tmp_path), progress=False, tensorboard=False, **QUICK_OVERRIDES
    )
    summary = train.train(cfg)
    assert np.isfinite(summary["final_return_avg"])
    learned = [r for r in read_rows(cfg.run_dir / "episodes.csv") if int(r["updates"]) > 0]
    assert learned and all(np.isfinite(float(r["loss"])) for r in learned)


def test_embedding_left_out_of_the_surgery_gets_its_plain_gradient():
    from methods import make_method
    from networks import make_network

    cfg = make_config("pcgrad-aware-no-embedding-surgery")
    torch.manual_seed(0)
    q_net = make_network(cfg)
    method = make_method(cfg, q_net)
    obs = torch.randn(6, 8)
    task_ids = torch.arange(3).repeat_interleave(2)
    with method.recording(2):
        q = q_net(obs, task_ids)
    # opposite targets: the tasks' gradients conflict on the shared layers
    losses = [(q[2 * t : 2 * t + 2] - (1.0 if t % 2 else -1.0)).pow(2).mean() for t in range(3)]
    method.optimizer.zero_grad()
    info = method.optimizer.backward(losses)
    assert info.num_conflicts > 0
    embedding = q_net.task_embedding.weight
    plain = [
        torch.autograd.grad(
            (q_net(obs, task_ids)[2 * t : 2 * t + 2] - (1.0 if t % 2 else -1.0)).pow(2).mean(),
            embedding,
        )[0]
        for t in range(3)
    ]
    torch.testing.assert_close(embedding.grad, sum(plain) / 3)
