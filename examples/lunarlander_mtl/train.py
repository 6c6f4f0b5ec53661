"""One DQN agent learns three LunarLander tasks at once; the study compares how the three
task gradients are combined (mean, PCGrad, GradNorm) and a bigger network (BRC).

    python examples/lunarlander_mtl/train.py                                 # full study + report
    python examples/lunarlander_mtl/train.py --config pcgrad-blind --seed 3  # one run
    python examples/lunarlander_mtl/train.py --quick                         # smoke run, < 1 min
    python examples/lunarlander_mtl/train.py --resume                        # continue after a kill
    python examples/lunarlander_mtl/train.py --help                          # every Config field

Read `train()` from top to bottom: set-up, then one loop over episodes in which every
`update_every` environment steps one update samples 64 transitions per task, computes one TD
loss per task and hands the three losses to the method under study.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import random
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from config import (
    BOOKKEEPING_FIELDS,
    CONFIGS,
    QUICK_OVERRIDES,
    STUDY_CONFIGS,
    STUDY_SEEDS,
    Config,
    add_config_arguments,
    make_config,
    overrides_from_args,
)
from envs import NUM_ACTIONS, NUM_TASKS, OBS_DIM, TASK_NAMES, make_env
from evaluate import EVAL_COLUMNS, evaluate, summarize
from methods import SIGNAL_COLUMNS, empty_signals, make_method, signals
from networks import categorical_projection, make_network
from replay import Batch, PerTaskReplayBuffer
from tqdm import tqdm

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # TensorBoard is optional
    SummaryWriter = None

EPISODE_COLUMNS = [
    "episode",  # global index over all tasks, 0..1499
    "task",
    "task_episode",  # index within the task, 0..499
    "return",
    "length",
    "epsilon",  # epsilon used during the episode
    "env_steps",  # total environment steps so far (all tasks)
    "updates",  # gradient updates during the episode
    "loss",  # mean over the episode's updates of the mean task loss
    *[f"loss_{name}" for name in TASK_NAMES],
    *SIGNAL_COLUMNS,  # PCGrad conflict rate and cosines, GradNorm weights (episode means)
]


def episode_seed(seed: int, episode: int) -> int:
    """Every training episode resets with its own seed derived from (run seed, episode).

    The environments are reset with a seed at every episode, so at an episode boundary
    they carry no state, and a resumed run replays exactly what the uninterrupted one does.
    """
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def td_losses(q_net, target_net, batch: Batch, task_ids: torch.Tensor, cfg: Config):
    """One TD loss per task, [num_tasks], from ONE forward pass over all tasks' samples.

    The batch is task-major (rows t*B..(t+1)*B-1 come from task t), so the per-sample
    losses reshape to [tasks, B] and each row's mean is that task's loss. The three losses
    share one graph; the method decides how they turn into a gradient.
    """
    obs = torch.from_numpy(batch.obs)
    actions = torch.from_numpy(batch.actions)
    rewards = torch.from_numpy(batch.rewards)
    next_obs = torch.from_numpy(batch.next_obs)
    # `terminated` is 1 only at a crash or landing, never at a time-out: a truncated
    # episode did not end in the MDP, so its last transition still bootstraps.
    not_done = 1.0 - torch.from_numpy(batch.terminated)
    rows = torch.arange(len(actions))

    if cfg.network == "brc":  # categorical value distribution, cross-entropy loss (C51)
        log_probs = q_net(obs, task_ids)[rows, actions].log_softmax(dim=-1)
        with torch.no_grad():
            next_probs = target_net(next_obs, task_ids).softmax(dim=-1)  # [N, A, atoms]
            if cfg.double_dqn:  # online net picks the action, target net values it
                best = q_net.q_values(next_obs, task_ids).argmax(dim=1)
            else:
                best = (next_probs * target_net.support).sum(dim=-1).argmax(dim=1)
            next_probs = next_probs[rows, best]  # [N, atoms]
            target = categorical_projection(
                next_probs, rewards, 1.0 - not_done, cfg.gamma, target_net.support
            )
        per_sample = -(target * log_probs).sum(dim=-1)
    else:
        q_taken = q_net(obs, task_ids)[rows, actions]
        with torch.no_grad():
            next_q = target_net(next_obs, task_ids)
            if cfg.double_dqn:  # online net picks the action, target net values it
                best = q_net(next_obs, task_ids).argmax(dim=1)
                next_value = next_q[rows, best]
            else:
                next_value = next_q.max(dim=1).values
            td_target = rewards + cfg.gamma * not_done * next_value
        if cfg.loss == "mse":
            per_sample = F.mse_loss(q_taken, td_target, reduction="none")
        elif cfg.loss == "huber":
            per_sample = F.smooth_l1_loss(q_taken, td_target, reduction="none")
        else:
            raise ValueError(f"unknown loss {cfg.loss!r}: expected mse or huber")
    return per_sample.view(NUM_TASKS, -1).mean(dim=1)


TARGET_UPDATES = ("episodes", "updates", "soft")


@torch.no_grad()
def update_target(target_net, q_net, cfg: Config, event: str, count: int) -> None:
    """Let the target network follow the online one, by `cfg.target_update`.

    Called after every gradient update (`event="updates"`, `count` = updates so far) and
    after every episode (`event="episodes"`, `count` = episodes finished). A hard copy
    happens when `count` reaches a multiple of `target_update_every` for the chosen event;
    the soft update moves every target parameter by `target_tau` towards the online one
    after every gradient update.
    """
    if cfg.target_update not in TARGET_UPDATES:
        raise ValueError(
            f"unknown target_update {cfg.target_update!r}: expected one of {TARGET_UPDATES}"
        )
    if cfg.target_update == "soft":
        if event == "updates":
            for target, online in zip(target_net.parameters(), q_net.parameters(), strict=True):
                target.lerp_(online, cfg.target_tau)
    elif cfg.target_update == event and count % cfg.target_update_every == 0:
        target_net.load_state_dict(q_net.state_dict())


def train(cfg: Config, resume: bool = False, overwrite: bool = False, position: int = 0) -> dict:
    """Train one run; returns its summary (final evaluation, last-100 training means)."""
    torch.set_num_threads(1)  # small networks: threads cost more than they give
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoint.pt"
    resuming = resume and ckpt_path.exists()
    if resuming:
        check_same_config(cfg, Config.from_json(run_dir / "config.json"))
    else:
        start_fresh(run_dir, overwrite=overwrite or resume)
        (run_dir / "config.json").write_text(cfg.to_json())

    # --- everything random is seeded from cfg.seed and saved in every checkpoint ---------
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # network initialisation
    rng = np.random.default_rng(cfg.seed)  # exploration
    buffer = PerTaskReplayBuffer(
        NUM_TASKS, cfg.buffer_size, OBS_DIM, rng=np.random.default_rng([cfg.seed, 1])
    )
    q_net = make_network(cfg)
    target_net = make_network(cfg)
    target_net.load_state_dict(q_net.state_dict())
    target_net.requires_grad_(False)
    method = make_method(cfg, q_net)
    train_envs = [make_env(t, cfg.max_episode_steps) for t in range(NUM_TASKS)]
    eval_envs = [make_env(t, cfg.max_episode_steps) for t in range(NUM_TASKS)]
    task_ids = torch.arange(NUM_TASKS).repeat_interleave(cfg.batch_size)  # [t]*64 per task
    single_task_id = [torch.tensor([t]) for t in range(NUM_TASKS)]  # for acting

    state = dict(
        episode=0,  # episodes finished (all tasks)
        env_steps=0,
        updates=0,
        epsilon=cfg.epsilon_start,
        recent_returns=[[] for _ in TASK_NAMES],  # last 100 training returns per task
        episode_rows=0,  # rows in episodes.csv / eval.csv covered by this checkpoint
        eval_rows=0,
        wall_time=0.0,
        finished=False,
    )
    if resuming:
        ckpt = torch.load(ckpt_path, weights_only=False)  # our own file: trusted
        q_net.load_state_dict(ckpt["q_net"])
        target_net.load_state_dict(ckpt["target_net"])
        method.load_state_dict(ckpt["method"])
        buffer.load_state_dict(ckpt["buffer"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        state = ckpt["state"]
        # Rows written after the checkpoint belong to work that is about to be redone.
        truncate_csv(run_dir / "episodes.csv", state["episode_rows"])
        truncate_csv(run_dir / "eval.csv", state["eval_rows"])
        if state["finished"]:
            return json.loads((run_dir / "summary.json").read_text())
    recent = [deque(r, maxlen=100) for r in state["recent_returns"]]
    session_start, session_steps, wall_before = time.perf_counter(), 0, state["wall_time"]

    def checkpoint() -> None:
        state["recent_returns"] = [list(r) for r in recent]
        state["wall_time"] = wall_before + time.perf_counter() - session_start
        save_atomic(
            dict(
                q_net=q_net.state_dict(),
                target_net=target_net.state_dict(),
                method=method.state_dict(),
                buffer=buffer.state_dict(),
                numpy_rng=rng.bit_generator.state,
                torch_rng=torch.get_rng_state(),
                python_rng=random.getstate(),
                state=state,
            ),
            ckpt_path,
        )

    episodes_log = CsvLog(run_dir / "episodes.csv", EPISODE_COLUMNS)
    eval_log = CsvLog(run_dir / "eval.csv", EVAL_COLUMNS)
    writer = None
    if cfg.tensorboard and SummaryWriter is not None:
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state["episode"])
    total_episodes = cfg.episodes_per_task * NUM_TASKS

    def run_evaluation(num_episodes: int, episodes_per_task: int, phase: str) -> list[dict]:
        rows = evaluate(
            q_net,
            eval_envs,
            TASK_NAMES,
            num_episodes=num_episodes,
            eval_seed=cfg.eval_seed,
            episodes_per_task=episodes_per_task,
            phase=phase,
        )
        eval_log.write(rows)
        state["eval_rows"] += len(rows)
        if writer is not None:
            for key, value in summarize(rows, TASK_NAMES).items():
                writer.add_scalar(f"eval/{phase}/{key}", value, state["episode"])
        return rows

    bar = tqdm(
        total=total_episodes,
        initial=state["episode"],
        desc=f"{cfg.config_name} seed {cfg.seed}",
        position=position,
        leave=position == 0,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    for episode in range(state["episode"], total_episodes):
        task = episode % NUM_TASKS  # round robin: standard, windy, heavy, standard, ...
        env = train_envs[task]
        obs, _ = env.reset(seed=episode_seed(cfg.seed, episode))
        epsilon = state["epsilon"]
        ep_return, ep_length, done = 0.0, 0, False
        loss_sums, ep_updates, signal_sums = np.zeros(NUM_TASKS), 0, {}

        while not done:
            # --- act: epsilon-greedy on the current task -------------------------------
            if rng.random() < epsilon:
                action = int(rng.integers(NUM_ACTIONS))
            else:
                with torch.inference_mode():
                    q = q_net.q_values(torch.from_numpy(obs).unsqueeze(0), single_task_id[task])
                action = int(q.argmax())
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(task, obs, action, reward, next_obs, terminated)  # not `truncated`
            obs = next_obs
            ep_return += float(reward)
            ep_length += 1
            state["env_steps"] += 1
            done = terminated or truncated

            # --- learn: every `update_every` steps, once every task's buffer is warm ----
            if state["env_steps"] % cfg.update_every == 0 and buffer.is_warm(cfg.min_replay_size):
                batch = buffer.sample_all(cfg.batch_size)  # 64 per task, task-major
                with method.recording(cfg.batch_size):  # no-op unless --engine partition
                    losses = td_losses(q_net, target_net, batch, task_ids, cfg)  # [3]
                info = None
                method.optimizer.zero_grad()
                if method.name == "mean":
                    losses.mean().backward()
                elif method.name == "pcgrad":  # project away conflicting components
                    info = method.optimizer.pc_backward(list(losses))
                elif method.name == "gradnorm":  # re-weight the tasks, then backward
                    info = method.gradnorm.backward(list(losses))
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(q_net.parameters(), cfg.max_grad_norm)
                method.optimizer.step()

                state["updates"] += 1
                ep_updates += 1
                update_target(target_net, q_net, cfg, "updates", state["updates"])
                loss_sums += losses.detach().numpy()
                for key, value in signals(info).items():
                    signal_sums[key] = signal_sums.get(key, 0.0) + value
        session_steps += ep_length

        # --- end of episode: log, decay epsilon, copy target, evaluate, checkpoint ------
        recent[task].append(ep_return)
        mean_losses = loss_sums / ep_updates if ep_updates else np.full(NUM_TASKS, math.nan)
        row = {
            "episode": episode,
            "task": TASK_NAMES[task],
            "task_episode": episode // NUM_TASKS,
            "return": ep_return,
            "length": ep_length,
            "epsilon": epsilon,
            "env_steps": state["env_steps"],
            "updates": ep_updates,
            "loss": float(mean_losses.mean()),
            **{f"loss_{n}": float(v) for n, v in zip(TASK_NAMES, mean_losses, strict=True)},
            **empty_signals(),
            **{k: v / ep_updates for k, v in signal_sums.items()},
        }
        episodes_log.write([row])
        state["episode_rows"] += 1
        if writer is not None:
            log_tensorboard(writer, row, episode)

        state["epsilon"] = max(cfg.epsilon_min, epsilon * cfg.epsilon_decay)
        update_target(target_net, q_net, cfg, "episodes", episode + 1)

        # Evaluate whenever every task has finished another `eval_every` episodes; at the
        # very end the final evaluation (below) takes the place of the periodic one.
        per_task = (episode + 1) // NUM_TASKS
        round_done = (episode + 1) % NUM_TASKS == 0
        if round_done and per_task % cfg.eval_every == 0 and per_task < cfg.episodes_per_task:
            run_evaluation(cfg.eval_episodes, per_task, "periodic")

        state["episode"] = episode + 1
        if state["episode"] % cfg.checkpoint_every == 0 or state["episode"] == total_episodes:
            checkpoint()
        elapsed = time.perf_counter() - session_start
        recent_means = {
            name[:5]: f"{np.mean(list(returns)[-20:]):.0f}"
            for name, returns in zip(TASK_NAMES, recent, strict=True)
            if returns
        }
        bar.update(1)
        bar.set_postfix(
            sps=f"{session_steps / max(elapsed, 1e-9):.0f}",
            eps=f"{state['epsilon']:.3f}",
            **recent_means,  # mean of the last 20 training returns per task
            refresh=False,
        )
    bar.close()

    # --- final greedy evaluation and summary ---------------------------------------------
    rows = run_evaluation(cfg.final_eval_episodes, cfg.episodes_per_task, "final")
    summary = {
        "config_name": cfg.config_name,
        "seed": cfg.seed,
        **{f"final_{k}": v for k, v in summarize(rows, TASK_NAMES).items()},
        **{
            f"last100_return_{n}": float(np.mean(r))
            for n, r in zip(TASK_NAMES, recent, strict=True)
        },
        "env_steps": state["env_steps"],
        "updates": state["updates"],
    }
    summary["last100_return_avg"] = float(
        np.mean([summary[f"last100_return_{n}"] for n in TASK_NAMES])
    )
    wall_time = wall_before + time.perf_counter() - session_start
    summary["wall_time_s"] = wall_time
    summary["env_steps_per_s"] = state["env_steps"] / max(wall_time, 1e-9)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    state["finished"] = True  # only once summary.json exists: a resume may return it
    checkpoint()
    if writer is not None:
        writer.close()
    for env in train_envs + eval_envs:
        env.close()
    return summary


# --- files ------------------------------------------------------------------------------


class CsvLog:
    """Append rows to a CSV file, flushed at once (a kill must not lose written rows)."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            for row in rows:
                writer.writerow(
                    {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                )


def truncate_csv(path: Path, num_rows: int) -> None:
    """Keep the header and the first `num_rows` rows."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[: num_rows + 1]))
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a kill leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def start_fresh(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "checkpoint.pt").exists() and not overwrite:
        raise SystemExit(
            f"{run_dir} already holds a run: pass --resume to continue it "
            "or --overwrite to start again"
        )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def check_same_config(cfg: Config, saved: Config) -> None:
    new, old = json.loads(cfg.to_json()), json.loads(saved.to_json())
    diff = {
        k: (old.get(k), v)
        for k, v in new.items()
        if k not in BOOKKEEPING_FIELDS and old.get(k) != v
    }
    if diff:
        raise SystemExit(f"--resume with a different config than the saved one: {diff}")


def log_tensorboard(writer, row: dict, episode: int) -> None:
    for key in ("return", "length"):
        writer.add_scalar(f"train/{row['task']}/{key}", row[key], episode)
    for key in ("epsilon", "loss", *SIGNAL_COLUMNS):
        if isinstance(row[key], float) and not math.isnan(row[key]):
            writer.add_scalar(f"train/{key}", row[key], episode)


# --- command line and the parallel study ------------------------------------------------

_worker_position = 0


def _init_worker(positions) -> None:
    global _worker_position
    _worker_position = positions.get()  # a fixed progress-bar line per worker process


def _train_in_worker(cfg: Config, resume: bool, overwrite: bool) -> dict:
    return train(cfg, resume=resume, overwrite=overwrite, position=_worker_position)


def run_many(configs: list[Config], workers: int, resume: bool, overwrite: bool) -> list[dict]:
    """Run in parallel processes, one per core; each process trains one run at a time."""
    workers = max(1, min(workers, len(configs)))
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    positions = context.Queue()
    for i in range(workers):
        positions.put(i + 1)
    summaries = []
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(positions,)
    ) as pool:
        futures = {pool.submit(_train_in_worker, cfg, resume, overwrite): cfg for cfg in configs}
        with tqdm(total=len(configs), desc="runs", position=0, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                summaries.append(future.result())
                cfg = futures[future]
                bar.write(
                    f"done {cfg.config_name} seed {cfg.seed}: 3-task final return "
                    f"{summaries[-1]['final_return_avg']:.1f}"
                )
                bar.update(1)
    return summaries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        nargs="+",
        choices=list(CONFIGS),
        default=None,
        help="configuration(s) to run (default: the seven of the study)",
    )
    parser.add_argument(
        "--seed",
        nargs="+",
        type=int,
        default=None,
        help="seed(s) to run (default: 0 1 2 3 4; --quick: 0)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny settings, every configuration, seed 0"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue runs from their last checkpoint (finished runs are kept)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start again even where a run already exists"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel processes for several runs (default: one per core)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write results.md and plots after several runs",
    )
    add_config_arguments(parser, skip=("config_name", "seed"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    names = args.config or list(STUDY_CONFIGS)
    seeds = args.seed or ([0] if args.quick else list(STUDY_SEEDS))
    overrides = {}
    if args.quick:
        overrides.update(QUICK_OVERRIDES, runs_dir=str(Path("runs") / "quick"))
    overrides.update(overrides_from_args(args, skip=("config_name", "seed")))
    configs = [make_config(name, seed=seed, **overrides) for seed in seeds for name in names]
    overwrite = args.overwrite or args.quick  # a smoke run has nothing worth keeping

    if len(configs) == 1:
        return [train(configs[0], resume=args.resume, overwrite=overwrite)]
    summaries = run_many(configs, args.workers, args.resume, overwrite)
    if not args.no_report:
        import report

        out = report.write_report(configs[0].runs_dir)
        print(f"report: {out}")
    return summaries


if __name__ == "__main__":
    main()
