"""One DQN agent learns three LunarLander tasks at once; the study compares how the three
task gradients are combined (mean, PCGrad, GradNorm) and a bigger network (BRC).

    python examples/lunarlander_mtl/train.py                                 # full study + report
    python examples/lunarlander_mtl/train.py --config pcgrad-blind --seed 3  # one run
    python examples/lunarlander_mtl/train.py --quick                         # smoke run (tiny)
    python examples/lunarlander_mtl/train.py --resume                        # continue after a kill
    python examples/lunarlander_mtl/train.py --help                          # every Config field

Read `train()` from top to bottom: set-up, then one loop over episodes in which every
`update_every` environment steps one update samples 64 transitions per task, computes one TD
loss per task and hands the three losses to the method under study.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from config import (
    CONFIGS,
    QUICK_OVERRIDES,
    STUDY_CONFIGS,
    STUDY_SEEDS,
    Config,
    add_config_arguments,
    configurations_help,
    make_config,
    overrides_from_args,
)
from envs import NUM_ACTIONS, NUM_TASKS, OBS_DIM, TASK_NAMES, make_env
from evaluate import EVAL_COLUMNS, evaluate, summarize
from methods import SIGNAL_COLUMNS, empty_signals, make_method
from networks import categorical_projection, make_network
from replay import Batch, PerTaskReplayBuffer
from runfiles import (
    CsvLog,
    RunError,
    RunLock,
    RunPlan,
    check_log,
    folder_contents,
    plan_run,
    prepare_folder,
    save_atomic,
    tidy_killed_run,
)
from stopping import EXIT_CODES, StopFlag, Stopped, on_stop_signals, watch_in_worker
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


LOG_COLUMNS = {"episodes.csv": EPISODE_COLUMNS, "eval.csv": EVAL_COLUMNS}


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    position: int = 0,
    stop: StopFlag | None = None,
) -> dict:
    """Train one run; returns its summary (final evaluation, last-100 training means).

    `resume` continues from the run's checkpoint (a finished run is returned as it is);
    `overwrite` deletes what the run folder holds and starts again. Without either, an
    existing run is refused. The folder is locked while the run writes it. When `stop` is
    set, the run raises `Stopped` at the next environment step or evaluation episode.
    """
    cfg.validate()
    if cfg.tensorboard and SummaryWriter is None:
        cfg = dataclasses.replace(cfg, tensorboard=False)  # config.json says what is true
    with RunLock(cfg.run_dir):
        plan = plan_run(cfg, resume, overwrite, LOG_COLUMNS, check_lock=False)
        prepare_folder(plan)
        try:
            with contextlib.ExitStack() as resources:
                stop = stop if stop is not None else StopFlag()
                return _train(cfg, plan, position, stop, resources)
        finally:  # a run stopped while saving leaves no temporary file behind
            (cfg.run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)


def _train(
    cfg: Config,
    plan: RunPlan,
    position: int,
    stop: StopFlag,
    resources: contextlib.ExitStack,
) -> dict:
    """The run itself; `resources` closes its environments, writer and bar however it ends."""
    torch.set_num_threads(1)  # small networks: threads cost more than they give
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoint.pt"
    if plan.action == "keep":
        return json.loads((run_dir / "summary.json").read_text())
    resuming = plan.action == "continue"
    if not resuming:
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
    for env in train_envs + eval_envs:
        resources.callback(env.close)
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
        update_time=0.0,  # seconds spent in gradient updates (sample, losses, backward, step)
        finished=False,
    )
    if resuming:
        ckpt = plan.checkpoint
        plan.checkpoint = None  # the plan's copy is not needed any longer
        q_net.load_state_dict(ckpt["q_net"])
        target_net.load_state_dict(ckpt["target_net"])
        method.load_state_dict(ckpt["method"])
        buffer.load_state_dict(ckpt["buffer"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        state = ckpt["state"]
        state.setdefault("update_time", math.nan)  # earlier versions did not time updates
        del ckpt
        # Rows written after the checkpoint belong to work that is about to be redone.
        check_log(run_dir / "episodes.csv", EPISODE_COLUMNS, state["episode_rows"], repair=True)
        check_log(run_dir / "eval.csv", EVAL_COLUMNS, state["eval_rows"], repair=True)
    recent = [deque(r, maxlen=100) for r in state["recent_returns"]]
    session_start, session_steps, wall_before = time.perf_counter(), 0, state["wall_time"]

    total_episodes = cfg.episodes_per_task * NUM_TASKS
    saved = {"episodes": state["episode"]}  # what the last checkpoint covers

    def stop_here() -> None:
        """A safe point: everything after the last checkpoint is redone on resume."""
        if stop:
            raise Stopped(cfg.config_name, cfg.seed, saved["episodes"], total_episodes)

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
        saved["episodes"] = state["episode"]

    episodes_log = CsvLog(run_dir / "episodes.csv", EPISODE_COLUMNS)
    eval_log = CsvLog(run_dir / "eval.csv", EVAL_COLUMNS)
    writer = None
    if cfg.tensorboard and SummaryWriter is not None:
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state["episode"])
        resources.callback(writer.close)

    def run_evaluation(num_episodes: int, episodes_per_task: int, phase: str) -> list[dict]:
        rows = evaluate(
            q_net,
            eval_envs,
            TASK_NAMES,
            num_episodes=num_episodes,
            eval_seed=cfg.eval_seed,
            episodes_per_task=episodes_per_task,
            phase=phase,
            check_stop=stop_here,
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
    resources.callback(bar.close)
    for episode in range(state["episode"], total_episodes):
        task = episode % NUM_TASKS  # round robin: standard, windy, heavy, standard, ...
        env = train_envs[task]
        obs, _ = env.reset(seed=episode_seed(cfg.seed, episode))
        epsilon = state["epsilon"]
        ep_return, ep_length, done = 0.0, 0, False
        loss_sums, ep_updates, signal_sums = np.zeros(NUM_TASKS), 0, {}

        while not done:
            stop_here()
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
                update_start = time.perf_counter()
                batch = buffer.sample_all(cfg.batch_size)  # 64 per task, task-major
                with method.recording(cfg.batch_size):  # no-op unless --engine partition
                    losses = td_losses(q_net, target_net, batch, task_ids, cfg)  # [3]
                # The method under study turns the three task losses into one gradient.
                method.optimizer.zero_grad()
                info = method.optimizer.backward(list(losses))
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(q_net.parameters(), cfg.max_grad_norm)
                method.optimizer.step()
                state["update_time"] += time.perf_counter() - update_start

                state["updates"] += 1
                ep_updates += 1
                update_target(target_net, q_net, cfg, "updates", state["updates"])
                loss_sums += losses.detach().numpy()
                for key, value in method.signals(info).items():
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
        if (episode + 1) % NUM_TASKS == 0:  # a round: one episode of every task
            method.end_round((episode + 1) // NUM_TASKS, state["updates"])

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
    if math.isfinite(state["update_time"]):  # unknown for runs begun by earlier versions
        summary["update_time_s"] = state["update_time"]
        summary["ms_per_update"] = 1e3 * state["update_time"] / max(state["updates"], 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    state["finished"] = True  # only once summary.json exists: a resume may return it
    checkpoint()
    return summary


def log_tensorboard(writer, row: dict, episode: int) -> None:
    for key in ("return", "length"):
        writer.add_scalar(f"train/{row['task']}/{key}", row[key], episode)
    for key in ("epsilon", "loss", *SIGNAL_COLUMNS):
        if isinstance(row[key], float) and not math.isnan(row[key]):
            writer.add_scalar(f"train/{key}", row[key], episode)


# --- the parallel study ----------------------------------------------------------------

_worker_position = 0
_worker_stop = StopFlag()
_worker_idle = threading.Event()  # set while the worker runs nothing


def _init_worker(positions, stop_event, parent_pid: int) -> None:
    global _worker_position
    _worker_position = positions.get()  # a fixed progress-bar line per worker process
    _worker_idle.set()
    watch_in_worker(_worker_stop, stop_event, parent_pid, _worker_idle)


def _train_in_worker(cfg: Config, resume: bool, overwrite: bool) -> dict | None:
    if _worker_stop:  # queued before the stop: leave it untouched
        return None
    _worker_idle.clear()
    try:
        return train(cfg, resume, overwrite, position=_worker_position, stop=_worker_stop)
    finally:
        _worker_idle.set()


@dataclasses.dataclass
class StudyOutcome:
    """What became of every planned run, for the closing report."""

    finished: list[tuple[Config, dict]] = dataclasses.field(default_factory=list)
    stopped: list[str] = dataclasses.field(default_factory=list)  # at their last checkpoint
    not_started: list[Config] = dataclasses.field(default_factory=list)
    failed: list[tuple[Config, str]] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None

    def report(self, resume_command: str) -> str:
        lines = []
        if self.stop_reason:
            lines.append(f"Stopped by {self.stop_reason}.")
        lines.append(f"  finished: {len(self.finished)} runs")
        lines += [f"  {text}" for text in self.stopped]
        if self.not_started:
            lines.append(f"  not started: {len(self.not_started)} runs")
        for cfg, message in self.failed:
            lines.append(f"  FAILED {cfg.config_name} seed {cfg.seed}: {message}")
        if self.stopped or self.not_started or self.failed:
            lines.append(f"Continue with: {resume_command}")
        return "\n".join(lines)


def run_many(
    configs: list[Config], workers: int, resume: bool, overwrite: bool, progress: bool = True
) -> StudyOutcome:
    """Run in parallel processes; each process trains one run at a time.

    The first Ctrl-C or SIGTERM asks every running run to stop at its next safe point and
    starts no other; a second one kills the workers (their last checkpoints stay).
    """
    workers = max(1, min(workers, len(configs)))
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    positions, stop_event = context.Queue(), context.Event()
    for i in range(workers):
        positions.put(i + 1)
    outcome, stop = StudyOutcome(), StopFlag()

    def first(name: str) -> None:
        stop.set(name)
        stop_event.set()
        print(
            f"\n{name}: stopping; the running runs stop at their next environment step and "
            "keep their last checkpoint (press Ctrl-C again to kill them at once)",
            file=sys.stderr,
        )

    def again(name: str) -> None:
        print(f"\n{name}: killing the workers; each run keeps its last checkpoint", file=sys.stderr)
        for child in multiprocessing.active_children():
            child.kill()

    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(positions, stop_event, os.getpid()),
    )
    with on_stop_signals(first, again), pool:
        pending = {pool.submit(_train_in_worker, cfg, resume, overwrite): cfg for cfg in configs}
        bar = tqdm(
            total=len(configs), desc="runs", position=0, dynamic_ncols=True, disable=not progress
        )
        while pending:
            # After a stop the workers skip the queued runs (they return None). Cancelling
            # those futures instead would hang a second Ctrl-C: CPython 3.11's pool, when its
            # workers are killed, dies on a cancelled future and never completes the others.
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                cfg = pending.pop(future)
                error = future.exception()
                if error is None and future.result() is None:
                    outcome.not_started.append(cfg)
                elif isinstance(error, Stopped):
                    outcome.stopped.append(str(error))
                elif isinstance(error, BrokenProcessPool):  # killed by a second Ctrl-C
                    if not folder_contents(cfg.run_dir):
                        outcome.not_started.append(cfg)
                    else:
                        what = tidy_killed_run(cfg.run_dir, LOG_COLUMNS)
                        outcome.stopped.append(f"{cfg.config_name} seed {cfg.seed}: {what}")
                elif error is not None:
                    outcome.failed.append((cfg, f"{type(error).__name__}: {error}"))
                    bar.write(f"FAILED {cfg.config_name} seed {cfg.seed}: {error}")
                else:
                    outcome.finished.append((cfg, future.result()))
                    bar.write(
                        f"done {cfg.config_name} seed {cfg.seed}: 3-task final return "
                        f"{future.result()['final_return_avg']:.1f}"
                    )
                bar.update(1)
        bar.close()
    outcome.stop_reason = stop.reason
    return outcome


def run_one(cfg: Config, resume: bool, overwrite: bool) -> StudyOutcome:
    """One run in this process, with the same stop rules as the study."""
    outcome, stop = StudyOutcome(), StopFlag()

    def first(name: str) -> None:
        stop.set(name)
        print(
            f"\n{name}: stopping at the next environment step (press Ctrl-C again to stop at once)",
            file=sys.stderr,
        )

    def again(name: str) -> None:
        raise SystemExit(f"{name}: stopped at once; the run keeps its last checkpoint")

    with on_stop_signals(first, again):
        try:
            outcome.finished.append((cfg, train(cfg, resume, overwrite, stop=stop)))
        except Stopped as stopped:
            outcome.stopped.append(str(stopped))
    outcome.stop_reason = stop.reason
    return outcome


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--config NAME ...] [--seed N ...] [--resume | --overwrite] [options]",
        description=__doc__,
        epilog=configurations_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        nargs="+",
        metavar="NAME",
        default=None,
        help="configuration(s) to run (default: the seven of the study; names listed below)",
    )
    parser.add_argument(
        "--seed",
        nargs="+",
        type=int,
        metavar="N",
        default=None,
        help="seed(s) to run, integers from 0 (default: 0 1 2 3 4; --quick: 0)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny settings, every configuration, seed 0"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue runs from their last checkpoint (finished runs are kept, new ones start)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what a run folder holds and start again (with --resume: only where there "
        "is no checkpoint to continue from)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="parallel processes for several runs, at least 1 (default: one per core)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write results.md and plots after several runs",
    )
    add_config_arguments(parser, skip=("config_name", "seed"))
    args = parser.parse_args(argv)
    unknown = [name for name in args.config or () if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1 process is needed")
    return args


def resume_command(argv: list[str]) -> str:
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    # The script as the user named it: from the repository root, examples/lunarlander_mtl/train.py.
    return " ".join(["python", sys.argv[0] or "train.py", *kept, "--resume"])


def plan_study(configs: list[Config], resume: bool, overwrite: bool) -> list[RunPlan]:
    """Check every planned run before any starts; refuse them all if one cannot run."""
    problems = sorted({problem for cfg in configs for problem in cfg.problems()})
    if problems:
        raise SystemExit("invalid configuration:\n  " + "\n  ".join(problems))
    plans, refusals = [], []
    for cfg in configs:
        try:
            plan = plan_run(cfg, resume, overwrite, LOG_COLUMNS)
        except RunError as err:
            refusals.append(f"{cfg.config_name} seed {cfg.seed}: {err}")
            continue
        plan.checkpoint = None  # read to check it; the run reads it again when it starts
        plans.append(plan)
    if refusals:
        raise SystemExit(
            f"Nothing was started: {len(refusals)} of {len(configs)} planned runs cannot run as "
            "asked.\n  " + "\n  ".join(refusals)
        )
    return plans


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = args.config or list(STUDY_CONFIGS)
    seeds = args.seed or ([0] if args.quick else list(STUDY_SEEDS))
    overrides = {}
    if args.quick:
        overrides.update(QUICK_OVERRIDES, runs_dir=str(Path("runs") / "quick"))
    overrides.update(overrides_from_args(args, skip=("config_name", "seed")))
    if overrides.get("tensorboard", True) and SummaryWriter is None:
        print(
            "TensorBoard is not installed (pip install tensorboard, or the example extra): "
            "no events are written, and config.json says tensorboard: false.",
            file=sys.stderr,
        )
        overrides["tensorboard"] = False
    configs = [make_config(name, seed=seed, **overrides) for seed in seeds for name in names]
    overwrite = args.overwrite or args.quick  # a smoke run has nothing worth keeping

    plans = plan_study(configs, args.resume, overwrite)
    changes = [plan.describe() for plan in plans if plan.action != "start"]
    if changes:
        print("Existing runs:\n  " + "\n  ".join(changes), file=sys.stderr)
    if len(configs) == 1:
        outcome = run_one(configs[0], args.resume, overwrite)
    else:
        outcome = run_many(configs, args.workers, args.resume, overwrite, configs[0].progress)
    if outcome.stop_reason or outcome.failed or len(configs) > 1:
        print(outcome.report(resume_command(argv)), file=sys.stderr)
    if outcome.stop_reason:
        raise SystemExit(EXIT_CODES.get(outcome.stop_reason, 1))
    if outcome.failed:
        raise SystemExit(1)
    if len(configs) > 1 and not args.no_report:
        import report

        out = report.write_report(configs[0].runs_dir)
        print(f"report: {out}")
    return [summary for _, summary in outcome.finished]


if __name__ == "__main__":
    main()
