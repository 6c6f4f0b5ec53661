"""How the three task losses become one gradient step: the only thing the study varies.

    mean      optimizer.zero_grad(); mean(losses).backward();          optimizer.step()
    pcgrad    optimizer.zero_grad(); optimizer.pc_backward(losses);    optimizer.step()
    gradnorm  optimizer.zero_grad(); gradnorm.backward(losses);        optimizer.step()

PCGrad and GradNorm come from gradsurgery's public API only. `train.py` spells out the
update; this module builds the objects and turns their diagnostics into log columns.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from config import Config
from envs import TASK_NAMES
from torch import nn

import gradsurgery as gs

# Columns the methods add to episodes.csv (empty where a method has no such signal).
TASK_PAIRS = [(i, j) for i in range(len(TASK_NAMES)) for j in range(i + 1, len(TASK_NAMES))]
COSINE_COLUMNS = [f"cos_{TASK_NAMES[i]}_{TASK_NAMES[j]}" for i, j in TASK_PAIRS]
WEIGHT_COLUMNS = [f"weight_{name}" for name in TASK_NAMES]
SIGNAL_COLUMNS = ["conflict_rate", *COSINE_COLUMNS, *WEIGHT_COLUMNS]


@dataclass
class Method:
    name: str
    optimizer: torch.optim.Optimizer | gs.PCGrad  # PCGrad wraps Adam and acts like it
    gradnorm: gs.GradNorm | None = None
    engine: gs.BatchPartitionEngine | None = None  # `--engine partition`

    def recording(self, batch_size: int):
        """Wrap the loss computation: a BatchPartitionEngine records the forward pass."""
        if self.engine is None:
            return contextlib.nullcontext()
        return self.engine.record(task_sizes=[batch_size] * len(TASK_NAMES))

    def state_dict(self) -> dict:
        return dict(
            optimizer=self.optimizer.state_dict(),
            gradnorm=None if self.gradnorm is None else self.gradnorm.state_dict(),
        )

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.gradnorm is not None:
            self.gradnorm.load_state_dict(state["gradnorm"])


def make_method(cfg: Config, q_net: nn.Module) -> Method:
    if cfg.optimizer == "adam":
        optimizer_cls, kwargs = torch.optim.Adam, {}
    elif cfg.optimizer == "adamw":
        optimizer_cls, kwargs = torch.optim.AdamW, dict(weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: expected adam or adamw")
    # fused=True: one kernel for the whole step, about 2x faster than the loop on CPU.
    optimizer = optimizer_cls(q_net.parameters(), lr=cfg.lr, fused=True, **kwargs)

    if cfg.method == "mean":
        return Method("mean", optimizer)
    # How PCGrad/GradNorm get the per-task gradients: one autograd call per task, or one
    # backward pass whose per-sample gradients are split by task (same result, faster).
    if cfg.engine == "autograd":
        engine = None
    elif cfg.engine == "partition":
        engine = gs.BatchPartitionEngine(q_net)
    else:
        raise ValueError(f"unknown engine {cfg.engine!r}: expected autograd or partition")
    if cfg.method == "pcgrad":
        # PCGrad visits the other tasks in random order; its own generator makes that
        # order reproducible and is saved in its state_dict (so resume is exact).
        generator = torch.Generator().manual_seed(cfg.seed)
        shared = None  # default: every parameter all three tasks reach, embedding included
        if not cfg.surgery_on_embedding:
            shared = [p for n, p in q_net.named_parameters() if not n.startswith("task_embedding")]
        pcgrad = gs.PCGrad(
            optimizer,
            reduction=cfg.pcgrad_reduction,
            generator=generator,
            shared_parameters=shared,
            engine=engine,
        )
        return Method("pcgrad", pcgrad, engine=engine)
    if cfg.method == "gradnorm":
        shared_layer = getattr(q_net, cfg.gradnorm_layer)
        gradnorm = gs.GradNorm(
            num_tasks=len(TASK_NAMES),
            shared_parameters=shared_layer.parameters(),
            alpha=cfg.gradnorm_alpha,
            lr=cfg.gradnorm_lr,
            engine=engine,
        )
        return Method("gradnorm", optimizer, gradnorm, engine)
    raise ValueError(f"unknown method {cfg.method!r}: expected mean, pcgrad or gradnorm")


def signals(info: gs.PCGradInfo | gs.GradNormInfo | None) -> dict[str, float]:
    """The per-update diagnostics logged for each method (averaged over an episode)."""
    if isinstance(info, gs.PCGradInfo):
        out = {"conflict_rate": float(info.conflict_rate)}
        cosine = info.cosine  # derived from the Gramian on each access: read it once
        for (i, j), column in zip(TASK_PAIRS, COSINE_COLUMNS, strict=True):
            out[column] = float(cosine[i, j])
        return out
    if isinstance(info, gs.GradNormInfo):
        return {column: float(w) for column, w in zip(WEIGHT_COLUMNS, info.weights, strict=True)}
    return {}


def empty_signals() -> dict[str, float]:
    return {column: math.nan for column in SIGNAL_COLUMNS}
