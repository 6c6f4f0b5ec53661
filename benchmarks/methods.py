"""One full training step per method: forward, gradient combination, optimizer step.

Every method gets its own copy of the model (same initial weights) and its own Adam, so no
method's optimizer state or hooks touch another's. The steps cycle through the same fixed
batches. Adam is ``fused=True``, as in the LunarLander example: the cheaper the optimizer
step, the larger (stricter) the ratios to the plain step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from method_registry import available_methods
from torch import nn

import gradsurgery as gs

from baselines import (
    TORCHJD_AGGREGATORS,
    ReferenceGradNorm,
    StraightforwardPCGrad,
    TorchjdAutogramPCGrad,
    TorchjdAutojac,
    torchjd_version,
)
from models import Batch, task_losses

LR = 5e-4
GRADNORM_ALPHA = 1.5
GRADNORM_LR = 0.01

Step = Callable[[], None]


@dataclass(frozen=True)
class MethodSpec:
    """A benchmarked method: its key in the JSON, its label in the tables, what builds it."""

    key: str
    label: str
    build: Callable[[nn.Module, list[Batch]], Step]
    needs: str = ""  # "fast" (gradsurgery's fast engine) or "torchjd"; "" always available
    target: float | None = None  # the step's bound as a multiple of the plain step, if any
    peer: str = ""  # the key of torchjd's implementation of the same method, if any


def fast_engine_available() -> bool:
    """Whether this gradsurgery has the batch-partition engine (the fast path)."""
    return hasattr(gs, "BatchPartitionEngine")


def _cycle(batches: list[Batch]) -> Callable[[], Batch]:
    index = 0

    def next_batch() -> Batch:
        nonlocal index
        index = (index + 1) % len(batches)
        return batches[index]

    return next_batch


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR, fused=True)


def plain(model: nn.Module, batches: list[Batch]) -> Step:
    """The reference: mean of the task losses, one backward."""
    optimizer, next_batch = _adam(model), _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        losses = task_losses(model, next_batch())
        (sum(losses) / len(losses)).backward()
        optimizer.step()

    return step


def _losses_fn(
    model: nn.Module, fast: bool, verify: str = "first"
) -> tuple[Callable[[Batch], list], dict]:
    """How a gradsurgery step computes its losses, and the ``engine=`` option to pass.

    With the batch-partition engine the forward pass runs inside ``engine.record(task_sizes)``,
    which tells the engine which rows belong to which task. ``verify`` is the engine's check
    against per-task autograd: ``"first"`` (its default) on the first step of each recording
    pattern, which the warm-up steps take; ``"always"`` at every step.
    """
    if not fast:
        return (lambda batch: task_losses(model, batch)), {}
    engine = gs.BatchPartitionEngine(model, verify=verify)

    def recorded_losses(batch: Batch) -> list[torch.Tensor]:
        with engine.record(task_sizes=batch.task_sizes):
            return task_losses(model, batch)

    return recorded_losses, {"engine": engine}


def gs_pcgrad(
    model: nn.Module, batches: list[Batch], fast: bool = False, verify: str = "first"
) -> Step:
    """gradsurgery's PCGrad, default (per-task autograd) engine or the batch-partition one."""
    losses, options = _losses_fn(model, fast, verify)
    optimizer, next_batch = gs.PCGrad(_adam(model), **options), _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        optimizer.pc_backward(losses(next_batch()))
        optimizer.step()

    return step


def gs_gradnorm(model: nn.Module, batches: list[Batch], fast: bool = False) -> Step:
    """gradsurgery's GradNorm balancing the norms at ``fc2``; one forward, no double backward."""
    num_tasks = len(batches[0].task_sizes)
    losses, options = _losses_fn(model, fast)
    optimizer, next_batch = _adam(model), _cycle(batches)
    gradnorm = gs.GradNorm(num_tasks, model.fc2, alpha=GRADNORM_ALPHA, lr=GRADNORM_LR, **options)

    def step() -> None:
        optimizer.zero_grad()
        gradnorm.backward(losses(next_batch()))
        optimizer.step()

    return step


def engine_hooks_only(model: nn.Module, batches: list[Batch]) -> Step:
    """DIAGNOSTIC: the plain step, its forward pass recorded by the engine's hooks."""
    recorded_losses, _ = _losses_fn(model, fast=True)
    optimizer, next_batch = _adam(model), _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        losses = recorded_losses(next_batch())
        (sum(losses) / len(losses)).backward()
        optimizer.step()

    return step


def engine_gradients_mean(model: nn.Module, batches: list[Batch]) -> Step:
    """DIAGNOSTIC: the engine's per-task gradients, averaged: a method with no surgery at all."""
    recorded_losses, options = _losses_fn(model, fast=True)
    optimizer, next_batch = _adam(model), _cycle(batches)
    params = list(model.parameters())
    numels = [p.numel() for p in params]

    def step() -> None:
        optimizer.zero_grad()
        jacobian = options["engine"].jacobian(recorded_losses(next_batch()), params)
        for p, grad in zip(params, jacobian.matrix.mean(dim=0).split(numels), strict=True):
            p.grad = grad.view_as(p)
        optimizer.step()

    return step


def straightforward_pcgrad(model: nn.Module, batches: list[Batch]) -> Step:
    """BASELINE: one retained backward per task and a Python loop of projections."""
    optimizer, next_batch = StraightforwardPCGrad(_adam(model)), _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        optimizer.pc_backward(task_losses(model, next_batch()))
        optimizer.step()

    return step


def reference_gradnorm(model: nn.Module, batches: list[Batch]) -> Step:
    """BASELINE: the reference study's GradNorm (double backward, second forward pass)."""
    num_tasks = len(batches[0].task_sizes)
    optimizer, next_batch = _adam(model), _cycle(batches)
    gradnorm = ReferenceGradNorm(num_tasks, model.fc2, alpha=GRADNORM_ALPHA, lr=GRADNORM_LR)

    def step() -> None:
        batch = next_batch()
        optimizer.zero_grad()
        gradnorm.update_weights(task_losses(model, batch), optimizer)
        gradnorm.weighted_loss(task_losses(model, batch)).backward()  # second forward
        optimizer.step()

    return step


def _torchjd_step(model: nn.Module, batches: list[Batch], combine) -> Step:
    """A training step whose ``backward`` is one of torchjd's (``combine.backward(losses)``)."""
    optimizer, next_batch = _adam(model), _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        combine.backward(task_losses(model, next_batch()))
        optimizer.step()

    return step


def torchjd_pcgrad_autogram(model: nn.Module, batches: list[Batch]) -> Step:
    """BASELINE: torchjd's PCGrad weighting on the Gramian of its autogram engine."""
    return _torchjd_step(model, batches, TorchjdAutogramPCGrad(model))


GRADIENT_TARGET = 1.3  # a method that reads per-task gradients (norms, Gramian, Jacobian)
LOSS_WEIGHTING_TARGET = 1.05  # a method that reads the loss values only


def gs_method(model: nn.Module, batches: list[Batch], name: str) -> Step:
    """A ``gradsurgery.methods`` class in ``gs.MultiTaskOptimizer``.

    A method that reads per-task gradients gets the batch-partition engine; a loss weighting
    (``Needs.LOSSES``) computes no per-task gradient, so it runs without one, as a user would.
    """
    num_tasks = len(batches[0].task_sizes)
    method = available_methods()[name].build_method(num_tasks)
    fast = method.needs > gs.Needs.LOSSES
    losses, options = _losses_fn(model, fast)
    # A method's learned parameters (UW's log-variances) join the optimizer as the wrapper
    # puts them there, as a user's would.
    optimizer = gs.MultiTaskOptimizer(_adam(model), method, **options)
    next_batch = _cycle(batches)

    def step() -> None:
        optimizer.zero_grad()
        optimizer.backward(losses(next_batch()))
        optimizer.step()

    return step


def torchjd_method(model: nn.Module, batches: list[Batch], name: str) -> Step:
    """BASELINE: torchjd's ``autojac.backward`` + ``jac_to_grad`` with its aggregator ``name``."""
    aggregator = TORCHJD_AGGREGATORS[name](len(batches[0].task_sizes))
    return _torchjd_step(model, batches, TorchjdAutojac(model, aggregator))


def _every_method() -> list[MethodSpec]:
    """A row per ``gradsurgery.methods`` class, and torchjd's implementation where it has one.

    PCGrad's rows are the hand-written ``gs-pcgrad-fast`` / ``torchjd-pcgrad`` above; Mean is
    the plain step.
    """
    specs = []
    for name, entry in available_methods().items():
        if entry.build_method is None or name in ("Mean", "PCGrad"):
            continue
        needs = entry.build_method(NUM_TASKS_HINT).needs
        fast = needs > gs.Needs.LOSSES
        key = f"gs-{name.lower()}" + ("-fast" if fast else "")
        if key in ("gs-gradnorm", "gs-gradnorm-fast"):  # the first API's GradNorm has these
            key = key.replace("gradnorm", "gradnorm-method")
        peer = f"torchjd-{name.lower()}" if name in TORCHJD_AGGREGATORS else ""
        engine = "batch-partition engine" if fast else "no per-task gradients"
        specs.append(
            MethodSpec(
                key,
                f"gradsurgery {name}, {engine}",
                lambda m, b, name=name: gs_method(m, b, name),
                needs="fast" if fast else "",
                target=GRADIENT_TARGET if fast else LOSS_WEIGHTING_TARGET,
                peer=peer,
            )
        )
        if peer:
            specs.append(
                MethodSpec(
                    peer,
                    f"baseline: torchjd {name} (autojac)",
                    lambda m, b, name=name: torchjd_method(m, b, name),
                    needs="torchjd",
                )
            )
    return specs


NUM_TASKS_HINT = 3  # only to read a method's Needs

METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in [
        MethodSpec("plain", "plain (mean loss, one backward)", plain),
        MethodSpec("gs-pcgrad", "gradsurgery PCGrad, default engine", gs_pcgrad),
        MethodSpec(
            "gs-pcgrad-fast",
            "gradsurgery PCGrad, batch-partition engine",
            lambda m, b: gs_pcgrad(m, b, fast=True),
            needs="fast",
            target=GRADIENT_TARGET,
            peer="torchjd-pcgrad",
        ),
        MethodSpec("gs-gradnorm", "gradsurgery GradNorm, default engine", gs_gradnorm),
        MethodSpec(
            "gs-gradnorm-fast",
            "gradsurgery GradNorm, batch-partition engine",
            lambda m, b: gs_gradnorm(m, b, fast=True),
            needs="fast",
            target=GRADIENT_TARGET,
        ),
        MethodSpec(
            "gs-pcgrad-fast-checked",
            "diagnostic: batch-partition PCGrad, checked against autograd every step",
            lambda m, b: gs_pcgrad(m, b, fast=True, verify="always"),
            needs="fast",
        ),
        MethodSpec(
            "engine-hooks",
            "diagnostic: plain step under the engine's hooks",
            engine_hooks_only,
            needs="fast",
        ),
        MethodSpec(
            "engine-mean",
            "diagnostic: engine's per-task gradients, averaged",
            engine_gradients_mean,
            needs="fast",
        ),
        MethodSpec(
            "straightforward-pcgrad",
            "baseline: straightforward PCGrad (loop)",
            straightforward_pcgrad,
        ),
        MethodSpec(
            "reference-gradnorm",
            "baseline: GradNorm the reference study's way",
            reference_gradnorm,
        ),
        MethodSpec(
            "torchjd-pcgrad",
            "baseline: torchjd PCGrad (autojac)",
            lambda m, b: torchjd_method(m, b, "PCGrad"),
            needs="torchjd",
        ),
        MethodSpec(
            "torchjd-pcgrad-autogram",
            "baseline: torchjd PCGrad (autogram engine)",
            torchjd_pcgrad_autogram,
            needs="torchjd",
        ),
        *_every_method(),
    ]
}


def available(key: str) -> bool:
    """Whether a method can run in this environment."""
    needs = METHODS[key].needs
    if needs == "fast":
        return fast_engine_available()
    if needs == "torchjd":
        return torchjd_version() is not None
    return True


def build_steps(keys: list[str], model: nn.Module, batches: list[Batch]) -> dict[str, Step]:
    """A step function per method, each on its own deep copy of ``model``."""
    return {key: METHODS[key].build(copy.deepcopy(model), batches) for key in keys}
