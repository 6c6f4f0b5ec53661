"""Every knob of the study in one typed dataclass, plus the named configurations.

A run is fully described by a `Config`: `train.py` saves it as `config.json` next to the
run's logs, and `report.py` reads it back. The command line is generated from the fields
below (`--episodes-per-task 100`, `--double-dqn`, ...), so a new field is a new flag.

Named configurations (`CONFIGS`) are small dicts of overrides on top of the defaults. To add
one (a Double-DQN variant, a tuned GradNorm alpha, ...), add an entry: nothing else changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import gradsurgery.methods


@dataclass
class Config:
    """Hyperparameters of one run (one configuration, one seed)."""

    # --- identity -----------------------------------------------------------------------
    config_name: str = "shared-aware"
    """Name of the configuration in `CONFIGS`; also the run's folder name."""
    seed: int = 0
    """Seeds network initialisation, exploration, replay sampling and training resets."""

    # --- network ------------------------------------------------------------------------
    network: str = "aware"
    """'blind' (state only), 'aware' (state + task embedding) or 'brc' (categorical ResNet)."""
    task_embedding_dim: int = 8
    """Size of the learned task embedding (aware: 8, brc: 32); unused by 'blind'."""
    num_atoms: int = 21
    """Atoms of the categorical value distribution ('brc' only)."""
    v_min: float = -300.0
    """Smallest atom of the categorical support (README: why +-300)."""
    v_max: float = 300.0
    """Largest atom."""

    # --- how the task losses become one update ---------------------------------------
    method: str = "mean"
    """Any method of gradsurgery.methods, lower-cased: 'mean' (average the task losses),
    'pcgrad', 'gradnorm', 'mgda', 'cagrad', 'nashmtl', 'dwa', ... (README: the methods)."""
    method_options: str = ""
    """Keyword arguments of the method beyond its flags, as a JSON object, e.g.
    '{"c": 0.5}' for CAGrad; empty: the library's defaults (the authors' values)."""
    epoch_rounds: int = 1
    """What an epoch is for the methods that count epochs (DWA's loss windows, STCH's
    warm-up): this many rounds, one training episode of every task each."""
    pcgrad_reduction: str = "mean"
    """How PCGrad merges the projected task gradients: 'mean' or 'sum'."""
    gradnorm_alpha: float = 1.5
    """GradNorm asymmetry: 0 equalises gradient norms, larger favours slow tasks."""
    gradnorm_lr: float = 0.01
    """Learning rate of GradNorm's task weights."""
    gradnorm_layer: str = "fc2"
    """Name of the shared layer whose gradient norms GradNorm balances."""
    surgery_on_embedding: bool = True
    """PCGrad: include the task embedding in the surgery, as the reference did. False keeps
    it out (`shared_parameters=` the other layers): each task's embedding row then gets the
    plain mean of the task gradients, unprojected."""
    engine: str = "partition"
    """Per-task gradients for PCGrad/GradNorm: 'partition' (gs.BatchPartitionEngine: one
    backward pass split by task) or 'autograd' (one backward per task; same result, slower)."""

    # --- optimisation -------------------------------------------------------------------
    optimizer: str = "adam"
    """'adam' or 'adamw'."""
    lr: float = 5e-4
    """Learning rate of the Q-network."""
    weight_decay: float = 0.0
    """Decoupled weight decay (only meaningful with 'adamw')."""
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    loss: str = "mse"
    """TD loss of the scalar DQNs: 'mse' or 'huber' (smooth L1, delta 1). 'brc' uses CE."""
    double_dqn: bool = False
    """Pick the bootstrap action with the online net and value it with the target net."""
    gamma: float = 0.99
    """Discount factor."""
    batch_size: int = 64
    """Transitions sampled from EACH task's buffer per update (3 x 64 in all)."""
    update_every: int = 4
    """One gradient update every this many environment steps (counted over all tasks)."""
    target_update: str = "episodes"
    """How the target network follows the online one: 'episodes' (hard copy every
    `target_update_every` episodes, counted over all tasks), 'updates' (hard copy every
    `target_update_every` gradient updates) or 'soft' (after every update, target +=
    `target_tau` * (online - target), as in Lillicrap et al. 2016)."""
    target_update_every: int = 10
    """Episodes ('episodes') or gradient updates ('updates') between two hard copies."""
    target_tau: float = 1e-3
    """Step of the soft target update ('soft' only); 1 copies after every update."""

    # --- replay -------------------------------------------------------------------------
    buffer_size: int = 100_000
    """Total replay capacity, split evenly between the tasks (33,333 each)."""
    min_replay_size: int = 2_000
    """No update until EVERY task's buffer holds at least this many transitions."""

    # --- schedule -----------------------------------------------------------------------
    episodes_per_task: int = 500
    """Training episodes per task; the tasks take turns (standard, windy, heavy, ...)."""
    epsilon_start: float = 1.0
    """Initial exploration rate."""
    epsilon_decay: float = 0.995
    """Epsilon is multiplied by this after every episode (all tasks share one epsilon)."""
    epsilon_min: float = 0.01
    """Floor of epsilon."""
    max_episode_steps: int = 0
    """0 keeps each task's own time limit (1000/400/800); >0 caps all (smoke tests)."""

    # --- evaluation ---------------------------------------------------------------------
    eval_every: int = 50
    """Greedy evaluation every this many episodes per task."""
    eval_episodes: int = 10
    """Episodes per task of each periodic evaluation."""
    final_eval_episodes: int = 20
    """Episodes per task of the final evaluation."""
    eval_seed: int = 10_000
    """Evaluation episode i of every run resets with seed eval_seed + i (paired comparison)."""

    # --- bookkeeping --------------------------------------------------------------------
    runs_dir: str = "runs"
    """Runs are written to <runs_dir>/<config_name>/seed-<seed>/."""
    checkpoint_every: int = 1
    """Checkpoint every this many episodes (1: a kill loses no finished episode)."""
    tensorboard: bool = True
    """Also write TensorBoard events when `torch.utils.tensorboard` can be imported."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def problems(self) -> list[str]:
        """Every value that cannot work, each with the way out; empty when all is well.

        Checked before any run starts, so a typo fails at once instead of hours later.
        """
        out = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        for name, choices in CHOICES.items():
            value = getattr(self, name)
            need(value in choices, f"--{_flag(name)} {value!r}: expected one of {choices}")
        need(
            self.config_name in CONFIGS,
            f"configuration {self.config_name!r} is unknown; known: {', '.join(CONFIGS)}",
        )
        need(
            0 <= self.seed < 2**32,
            f"--seed {self.seed}: seeds are integers from 0 to 2**32 - 1",
        )
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            need(value >= 1, f"--{_flag(name)} {value}: must be at least 1")
        for name in ("max_episode_steps", "task_embedding_dim", "eval_seed"):
            value = getattr(self, name)
            need(value >= 0, f"--{_flag(name)} {value}: must be 0 or more")
        try:
            options = self.method_keywords()
        except ValueError as err:
            out.append(str(err))
        else:
            if self.method in METHOD_CLASSES:
                method_class = METHOD_CLASSES[self.method]
                accepted = inspect.signature(method_class).parameters
                unknown = sorted(set(options) - set(accepted))
                need(
                    not unknown,
                    f"--method-options: {self.method} takes no argument named "
                    f"{', '.join(unknown)}; its arguments: {', '.join(accepted) or 'none'}",
                )
        need(self.num_atoms >= 2, f"--num-atoms {self.num_atoms}: must be at least 2")
        for name, low, high, low_open, high_open in FLOAT_RANGES:
            value = getattr(self, name)
            above = value > low if low_open else value >= low
            below = value < high if high_open else value <= high
            if not (math.isfinite(value) and above and below):
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                out.append(f"--{_flag(name)} {value}: must be a finite number in {interval}")
        need(
            math.isfinite(self.v_min) and math.isfinite(self.v_max) and self.v_min < self.v_max,
            f"--v-min {self.v_min} / --v-max {self.v_max}: need finite v_min < v_max",
        )
        need(
            self.epsilon_min <= self.epsilon_start,
            f"--epsilon-min {self.epsilon_min} is above --epsilon-start {self.epsilon_start}",
        )
        per_task = self.buffer_size // NUM_TASKS_IN_STUDY
        need(
            self.min_replay_size <= per_task,
            f"--min-replay-size {self.min_replay_size} is more than one task's share of the "
            f"buffer ({self.buffer_size} // {NUM_TASKS_IN_STUDY} = {per_task}): learning would "
            "never start; raise --buffer-size or lower --min-replay-size",
        )
        return out

    def method_keywords(self) -> dict[str, typing.Any]:
        """`method_options` read: the method's keyword arguments beyond its flags."""
        if not self.method_options.strip():
            return {}
        try:
            options = json.loads(self.method_options)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--method-options {self.method_options!r} is not JSON ({err}); write an "
                """object such as '{"c": 0.5}'"""
            ) from None
        if not isinstance(options, dict):
            raise ValueError(
                f"--method-options {self.method_options!r} is not a JSON object; write the "
                """keyword arguments as one, such as '{"c": 0.5}'"""
            )
        return options

    def validate(self) -> None:
        """Raise `ValueError` listing every problem of `problems()`."""
        problems = self.problems()
        if problems:
            raise ValueError(
                f"invalid configuration {self.config_name!r} (seed {self.seed}):\n  "
                + "\n  ".join(problems)
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.config_name / f"seed-{self.seed}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _flag(name: str) -> str:
    return name.replace("_", "-")


NUM_TASKS_IN_STUDY = 3  # standard, windy, heavy (envs.py; not imported: no gym at parse time)

# `--method`: every method of the library, by its lower-cased class name.
METHOD_CLASSES: dict[str, type[gradsurgery.Method]] = {
    name.lower(): getattr(gradsurgery.methods, name)
    for name in sorted(gradsurgery.methods.__all__, key=str.lower)
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_CLASSES)

# The values each string field accepts.
CHOICES: dict[str, tuple[str, ...]] = {
    "network": ("blind", "aware", "brc"),
    "method": METHOD_NAMES,
    "pcgrad_reduction": ("mean", "sum"),
    "engine": ("partition", "autograd"),
    "optimizer": ("adam", "adamw"),
    "loss": ("mse", "huber"),
    "target_update": ("episodes", "updates", "soft"),
}
# Counts that must be at least 1.
POSITIVE_INTS = (
    "batch_size",
    "update_every",
    "target_update_every",
    "buffer_size",
    "min_replay_size",
    "episodes_per_task",
    "eval_every",
    "eval_episodes",
    "final_eval_episodes",
    "checkpoint_every",
    "epoch_rounds",
)
# (field, low, high, low excluded, high excluded): finite and inside the interval.
FLOAT_RANGES = (
    ("lr", 0.0, math.inf, True, True),
    ("weight_decay", 0.0, math.inf, False, True),
    ("max_grad_norm", 0.0, math.inf, False, True),
    ("gamma", 0.0, 1.0, False, False),
    ("gradnorm_alpha", 0.0, math.inf, False, True),
    ("gradnorm_lr", 0.0, math.inf, True, True),
    ("target_tau", 0.0, 1.0, True, False),
    ("epsilon_start", 0.0, 1.0, False, False),
    ("epsilon_decay", 0.0, 1.0, True, False),
    ("epsilon_min", 0.0, 1.0, False, False),
)

# Fields that do not change what is computed: a resumed run may differ in these.
BOOKKEEPING_FIELDS = ("runs_dir", "tensorboard", "progress")

# The seven configurations of the study. Each entry overrides `Config` defaults.
CONFIGS: dict[str, dict[str, typing.Any]] = {
    "shared-blind": dict(network="blind", method="mean"),
    "shared-aware": dict(network="aware", method="mean"),
    "pcgrad-blind": dict(network="blind", method="pcgrad"),
    "pcgrad-aware": dict(network="aware", method="pcgrad"),
    "gradnorm-blind": dict(network="blind", method="gradnorm"),
    "gradnorm-aware": dict(network="aware", method="gradnorm"),
    "brc": dict(
        network="brc",
        task_embedding_dim=32,
        method="mean",
        optimizer="adamw",
        lr=2.5e-4,
        weight_decay=1e-4,
        max_grad_norm=10.0,
    ),
}

# Beyond the reference: documented DQN and MTL improvements, each a small change of
# one reference configuration. Opt-in: `--config shared-aware-ddqn-huber`, ...
CONFIGS.update(
    {
        # Double DQN (van Hasselt et al. 2016) and the Huber loss (Mnih et al. 2015).
        "shared-aware-ddqn-huber": dict(network="aware", double_dqn=True, loss="huber"),
        "gradnorm-blind-ddqn-huber": dict(
            network="blind", method="gradnorm", double_dqn=True, loss="huber"
        ),
        # A gentler GradNorm asymmetry (the paper tunes alpha per problem, 0.12 to 1.5).
        "gradnorm-blind-alpha0.5": dict(network="blind", method="gradnorm", gradnorm_alpha=0.5),
        # PCGrad as in the paper: the projected gradients are summed, not averaged.
        "pcgrad-blind-sum": dict(network="blind", method="pcgrad", pcgrad_reduction="sum"),
        # PCGrad with the task embedding left out of the surgery (task-specific parameters).
        "pcgrad-aware-no-embedding-surgery": dict(
            network="aware", method="pcgrad", surgery_on_embedding=False
        ),
    }
)

# The reference fixes "target_update_freq = 10" but not what it counts, nor how often the
# agent learns. Three readings of it on the baseline, opt-in like the entries above:
CONFIGS.update(
    {
        # The widely copied LunarLander DQN: learn every 4 steps, soft target (tau 1e-3).
        "shared-aware-soft": dict(network="aware", target_update="soft", target_tau=1e-3),
        # Learn at every environment step, hard copy every 10 episodes.
        "shared-aware-learn1": dict(network="aware", update_every=1),
        # Learn every 4 steps, hard copy every 10 gradient updates.
        "shared-aware-copy10u": dict(
            network="aware", target_update="updates", target_update_every=10
        ),
    }
)
# The soft reading on the reference's best method and on its most-cited one, to see whether
# the reference's ranking holds under it.
CONFIGS.update(
    {
        f"{name}-soft": dict(CONFIGS[name], target_update="soft", target_tau=1e-3)
        for name in ("gradnorm-blind", "pcgrad-blind")
    }
)

# Every other method of the library on the task-blind network (where the reference found its
# best result), opt-in like the entries above. Each uses the library's defaults, which are the
# authors' recommended values, except where the authors published values for multi-task
# reinforcement learning (Meta-World MT10): those are given here. README: every value, and
# where it comes from.
METHOD_OPTIONS_OF_THE_STUDY: dict[str, dict[str, typing.Any]] = {
    "mgda": {},
    "cagrad": {"c": 0.9},  # the authors' MT10 runs (0.4: their NYUv2 runs, the default)
    "nashmtl": {},
    "imtlg": {},
    "alignedmtl": {},
    "upgrad": {},
    "dualproj": {},
    "fairgrad": {"alpha": 2.0},  # the authors' MT10 runs (and their other experiments)
    "config": {},
    "gradvac": {},
    "graddrop": {},
    "famo": {},
    "uw": {},
    "imtll": {},
    "dwa": {},
    "rlw": {},
    "dbmtl": {},
    "gls": {},
    "stch": {},
}
METHOD_CONFIGS: tuple[str, ...] = tuple(f"{method}-blind" for method in METHOD_OPTIONS_OF_THE_STUDY)
CONFIGS.update(
    {
        f"{method}-blind": dict(
            network="blind",
            method=method,
            **({"method_options": json.dumps(options)} if options else {}),
        )
        for method, options in METHOD_OPTIONS_OF_THE_STUDY.items()
    }
)

# The three methods that beat both baselines on the task-blind network (DB-MTL, Aligned-MTL,
# FairGrad), under the soft reading of the target update, which lifted the baseline as much as
# they did: whether the two gains add up. Opt-in like the entries above.
CONFIGS.update(
    {
        f"{name}-soft": dict(CONFIGS[name], target_update="soft", target_tau=1e-3)
        for name in ("dbmtl-blind", "alignedmtl-blind", "fairgrad-blind")
    }
)

# The methods that beat the baselines on the task-blind network all give the windy task about
# a fifth of the total weight (results.md, "Task weights": the mean shares of Aligned-MTL,
# CAGrad, DB-MTL, IMTL-G, Nash-MTL and UW). Those shares, fixed, tell whether the gain is the
# level of the weights or how they move. Chosen after the fact from the study's own runs: a
# diagnostic, not a method to rank against the others on equal terms.
FIXED_WEIGHTS_OF_THE_STUDY = (0.44, 0.20, 0.36)
CONFIGS["fixedweights-blind"] = dict(
    network="blind",
    method="linearscalarization",
    method_options=json.dumps({"weights": list(FIXED_WEIGHTS_OF_THE_STUDY)}),
)

# What `train.py` with no arguments runs. Extra entries of CONFIGS stay opt-in.
STUDY_CONFIGS: tuple[str, ...] = (
    "shared-blind",
    "shared-aware",
    "pcgrad-blind",
    "pcgrad-aware",
    "gradnorm-blind",
    "gradnorm-aware",
    "brc",
)
STUDY_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
BASELINE = "shared-aware"

# `--quick`: every code path (warm-up, updates, target copies, evaluations, checkpoints) in
# a few seconds per configuration. The numbers mean nothing.
QUICK_OVERRIDES: dict[str, typing.Any] = dict(
    episodes_per_task=4,
    min_replay_size=100,
    max_episode_steps=150,
    target_update_every=3,
    eval_every=2,
    eval_episodes=2,
    final_eval_episodes=2,
)


def make_config(name: str, **overrides: typing.Any) -> Config:
    """Defaults < named configuration < `overrides`."""
    if name not in CONFIGS:
        raise KeyError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return Config(**{**CONFIGS[name], **overrides, "config_name": name})


# --- command line generated from the dataclass -------------------------------------------


def _field_type(field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(Config)
    return hints[field.name]


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per Config field; defaults are None so only what is typed overrides."""
    group = parser.add_argument_group("Config fields (override the named configuration)")
    for field in dataclasses.fields(Config):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        help_text = f"{FIELD_DOCS.get(field.name, '')} (default: {field.default})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif field.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[field.name], default=None, help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT"}.get(kind, "TEXT")
            group.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)


def configurations_help() -> str:
    """The named configurations, one a line, with what each changes (for `--help`)."""
    width = max(len(name) for name in CONFIGS)
    lines = ["configurations (--config NAME; * = part of the default study):"]
    for name, overrides in CONFIGS.items():
        changes = ", ".join(f"{k}={v}" for k, v in overrides.items())
        mark = "*" if name in STUDY_CONFIGS else " "
        lines.append(f"  {mark} {name:<{width}}  {changes}")
    return "\n".join(lines)


def overrides_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Config)
        if f.name not in skip and getattr(args, f.name, None) is not None
    }


def _field_docs() -> dict[str, str]:
    """The attribute docstrings above, read from this file so `--help` shows them."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif (
            last
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[last] = " ".join(node.value.value.split())
            last = None
        else:
            last = None
    return docs


FIELD_DOCS = _field_docs()
