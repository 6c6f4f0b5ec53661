"""How the three task losses become one gradient step: the only thing the study varies.

Every method is the same call: the optimizer wrapped with the method named by `--method`,

    optimizer = gs.MultiTaskOptimizer(Adam(q_net.parameters()), gs.methods.PCGrad(...))
    optimizer.zero_grad(); info = optimizer.backward(task_losses); optimizer.step()

`--method` takes the name of any method in `gs.methods`, lower-cased (`mean`, `pcgrad`,
`gradnorm`, `mgda`, `dwa`, ...); PCGrad's and GradNorm's hyper-parameters are flags
(`METHOD_OPTIONS`), every method's are `--method-options` (a JSON object). gradsurgery's
public API only; this module builds the wrapper, tells the methods that count epochs when
one ends, and turns the diagnostics into log columns.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
from config import METHOD_CLASSES, Config
from envs import TASK_NAMES
from torch import nn

import gradsurgery as gs

# Columns the methods add to episodes.csv (empty where a method has no such signal).
TASK_PAIRS = [(i, j) for i in range(len(TASK_NAMES)) for j in range(i + 1, len(TASK_NAMES))]
COSINE_COLUMNS = [f"cos_{TASK_NAMES[i]}_{TASK_NAMES[j]}" for i, j in TASK_PAIRS]
WEIGHT_COLUMNS = [f"weight_{name}" for name in TASK_NAMES]
SIGNAL_COLUMNS = ["conflict_rate", *COSINE_COLUMNS, *WEIGHT_COLUMNS]

# Hyper-parameters given as flags: method name -> {method argument: Config field}.
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "pcgrad": {"reduction": "pcgrad_reduction"},
    "gradnorm": {"alpha": "gradnorm_alpha", "lr": "gradnorm_lr"},
}
# Methods that balance the gradients of one layer: method name -> Config field of its name.
SHARED_LAYER: dict[str, str] = {"gradnorm": "gradnorm_layer"}


def method_classes() -> dict[str, type[gs.Method]]:
    """Every method of the library by its lower-cased name: {'mean': gs.methods.Mean, ...}."""
    return dict(METHOD_CLASSES)


@dataclass
class Method:
    name: str
    optimizer: gs.MultiTaskOptimizer  # wraps Adam and acts like it
    engine: gs.BatchPartitionEngine | None = None  # `--engine partition`
    epoch_rounds: int = 1  # rounds per epoch, for the methods that count epochs

    def signals(self, info: gs.StepInfo | None) -> dict[str, float]:
        """The update's diagnostics as log columns (Mean's constant weights are not logged)."""
        return signals(info, log_weights=self.name != "mean")

    def end_round(self, rounds: int, updates: int) -> None:
        """Called after every round (one training episode of every task, `rounds` so far).

        A DQN has no epochs; for the methods that count them (DWA's loss windows, STCH's
        warm-up) an epoch is `epoch_rounds` rounds. Epochs start once learning has
        (`updates` > 0): before that no loss has been seen, and an epoch without a step
        would count towards STCH's warm-up.
        """
        method = self.optimizer.method
        if updates > 0 and rounds % self.epoch_rounds == 0 and counts_epochs(method):
            method.end_epoch()

    def recording(self, batch_size: int):
        """Wrap the loss computation: a BatchPartitionEngine records the forward pass."""
        if self.engine is None:
            return contextlib.nullcontext()
        return self.engine.record(task_sizes=[batch_size] * len(TASK_NAMES))

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "gradnorm" in state:  # a checkpoint of an earlier version of this example
            state = earlier_layout(state)
        self.optimizer.load_state_dict(state)


def earlier_layout(state: dict) -> dict:
    """The wrapper's state_dict from `{optimizer, gradnorm}`, the layout of earlier versions
    (the plain or PCGrad-wrapped optimizer, and a stand-alone GradNorm's state or None)."""
    if "num_tasks" in state["optimizer"]:  # PCGrad: already the wrapper's state_dict
        return state["optimizer"]
    gradnorm = state["gradnorm"]
    return dict(
        optimizer=state["optimizer"],
        method={} if gradnorm is None else gradnorm,
        generator=None,
        num_tasks=None if gradnorm is None else len(TASK_NAMES),
    )


def make_method(cfg: Config, q_net: nn.Module) -> Method:
    if cfg.optimizer == "adam":
        optimizer_cls, kwargs = torch.optim.Adam, {}
    elif cfg.optimizer == "adamw":
        optimizer_cls, kwargs = torch.optim.AdamW, dict(weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected adam or adamw")
    # fused=True: one kernel for the whole step, about 2x faster than the loop on CPU.
    optimizer = optimizer_cls(q_net.parameters(), lr=cfg.lr, fused=True, **kwargs)

    classes = method_classes()
    if cfg.method not in classes:
        raise ValueError(f"unknown method {cfg.method!r}: expected one of {', '.join(classes)}")
    method_class = classes[cfg.method]
    method = method_class(**method_arguments(cfg, method_class))

    # Per-task gradients (methods that read more than the loss values): one autograd call
    # per task, or one backward pass whose per-sample gradients are split by task.
    engine = None
    if method.needs > gs.Needs.LOSSES and cfg.engine == "partition":
        engine = gs.BatchPartitionEngine(q_net)
    wrapper = gs.MultiTaskOptimizer(
        optimizer, method, shared_parameters=shared_parameters(cfg, q_net), engine=engine
    )
    return Method(cfg.method, wrapper, engine, cfg.epoch_rounds)


def counts_epochs(method: gs.Method) -> bool:
    """Whether the method has epochs to be told about (`end_epoch`)."""
    if isinstance(method, gs.methods.DWA):
        return method.window == "epoch"  # window="step" has none
    return callable(getattr(method, "end_epoch", None))


def method_arguments(cfg: Config, method_class: type[gs.Method]) -> dict:
    """The method's keyword arguments: its flags, `--method-options`, the number of tasks
    where the method needs it, and a generator seeded by the run where it draws."""
    flags = METHOD_OPTIONS.get(cfg.method, {})
    options = {arg: getattr(cfg, field) for arg, field in flags.items()}
    extra = cfg.method_keywords()
    twice = sorted(set(options) & set(extra))
    if twice:
        raise ValueError(
            f"--method-options sets {', '.join(twice)} of {cfg.method}, which its flags "
            f"({', '.join('--' + flags[a].replace('_', '-') for a in twice)}) already set: "
            "give it once, as the flag"
        )
    options.update(extra)
    parameters = inspect.signature(method_class).parameters
    num_tasks = parameters.get("num_tasks")
    if num_tasks is not None and num_tasks.default is inspect.Parameter.empty:
        options.setdefault("num_tasks", len(TASK_NAMES))  # UW, IMTL-L, FAMO
    if "generator" in parameters:
        # A random method (PCGrad's projection order, RLW's weights) draws from its own
        # generator, seeded by the run and saved in the optimizer's state_dict: a resumed run
        # draws the same.
        options["generator"] = torch.Generator().manual_seed(cfg.seed)
    return options


def shared_parameters(cfg: Config, q_net: nn.Module) -> list[nn.Parameter] | None:
    """What the method reads the task gradients of (None: all that every task reaches)."""
    if cfg.method in SHARED_LAYER:  # GradNorm balances the norms at one shared layer
        layer_name = getattr(cfg, SHARED_LAYER[cfg.method])
        layers = dict(q_net.named_children())
        if layer_name not in layers:
            raise ValueError(
                f"--gradnorm-layer {layer_name!r} is not a layer of the {cfg.network} network; "
                f"its layers: {', '.join(layers)}"
            )
        return list(layers[layer_name].parameters())
    if not cfg.surgery_on_embedding:  # the task embedding gets the plain mean, unprojected
        return [p for n, p in q_net.named_parameters() if not n.startswith("task_embedding")]
    return None  # every parameter all three tasks reach, the task embedding included


def signals(info: gs.StepInfo | None, log_weights: bool = False) -> dict[str, float]:
    """The per-update diagnostics logged for each method (averaged over an episode):
    PCGrad's conflicts and cosines, GradNorm's weights, and with `log_weights` the task
    weights of every other method that reports them."""
    if isinstance(info, gs.PCGradInfo):
        out = {"conflict_rate": float(info.conflict_rate)}
        cosine = info.cosine  # derived from the Gramian on each access: read it once
        for (i, j), column in zip(TASK_PAIRS, COSINE_COLUMNS, strict=True):
            out[column] = float(cosine[i, j])
        return out
    if isinstance(info, gs.GradNormInfo):
        return {column: float(w) for column, w in zip(WEIGHT_COLUMNS, info.weights, strict=True)}
    weights = None if info is None or not log_weights else info.weights
    if weights is None:
        return {}
    return {column: float(w) for column, w in zip(WEIGHT_COLUMNS, weights, strict=True)}


def empty_signals() -> dict[str, float]:
    return {column: math.nan for column in SIGNAL_COLUMNS}
