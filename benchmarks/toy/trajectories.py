"""Optimize the toy problem from several starts with every method, as the papers do.

Each method starts from each start point and takes ``steps`` Adam steps on the combination
of the two task gradients it decides. Two ways to run a method, with the same result:

``batched``
    For a gradsurgery :class:`~gradsurgery._weighting.Method` that returns task weights (and
    for the mean). All (method, start) pairs are one ``[N, 2]`` batch of independent points:
    one forward and two backward passes give every point's losses and ``2 x 2`` Jacobian, one
    batched product every Gramian; each point's own method object decides its weights from
    its :class:`~gradsurgery._weighting.TaskStats` and commits its state; one Adam steps the
    whole batch (Adam is elementwise, so this is one independent Adam per point).
``wrapper``
    For everything else (gradsurgery's first API, a method with parameters of its own or one
    that needs the per-task gradients' coordinates): each start gets its own parameter,
    optimizer and the library's training step (``zero_grad``, ``backward(losses)``, ``step``).

A method that raises at a point, or whose point stops being finite, leaves that point where
it stood (the other starts go on) and its failure is recorded: a benchmark reports what the
methods do, including their failures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from gradsurgery._weighting import Method, Needs, TaskStats

from problem import toy_losses, toy_losses_and_jacobians


@dataclass(frozen=True)
class Setting:
    """One of the papers' experiments."""

    name: str
    starts: tuple[tuple[float, float], ...]
    steps: int
    scale: float = 1.0  # of the first loss
    lr: float = 1e-3
    reference: str = ""

    @property
    def loss_offsets(self) -> tuple[float, float]:
        """What the methods see added to the losses: ``21 * scale_i``, FAMO's bounds.

        The losses reach about ``-20 * scale_i``; the methods that weigh losses by their
        values need them positive, so every method reads ``L_i + 21 * scale_i``, as FAMO's
        authors set its lower bounds on this problem (``set_min_losses([-21 * scale, -21])``
        in ``experiments/toy/trainer.py`` of github.com/Cranial-XIX/FAMO, commit
        0a6ad06dbdd55fce73ec01e3a175c2498cd1e5e9). The gradients are unchanged.
        """
        return (21.0 * self.scale, 21.0)


CAGRAD = Setting(
    "cagrad", ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)), 100_000,
    reference="CAGrad (Liu et al. 2021), Figure 1: toy.py run_all()",
)  # fmt: skip
NASH_MTL = Setting(
    "nashmtl", ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)), 35_000, 0.1,
    reference="Nash-MTL (Navon et al. 2022), Figure 2: experiments/toy/trainer.py",
)  # fmt: skip
SETTINGS = {setting.name: setting for setting in (CAGRAD, NASH_MTL)}


@dataclass
class MethodRun:
    """What one method did from every start of a setting."""

    name: str
    path: str  # "batched" or "wrapper"
    trajectory: list[list[list[float]]] = field(default_factory=list)  # [record][start][x1, x2]
    recorded_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0  # CPU time of the running thread (load from other processes excluded)
    failure: str = ""  # empty when every step went through


class _Frozen(Exception):
    pass


def recorded_steps(steps: int, every: int) -> list[int]:
    """The steps whose point is recorded (before the step is taken): every ``every``-th, the end."""
    return sorted({*range(0, steps, every), steps})


def _weights_of(decision) -> list[float]:
    if decision.direction is not None:
        raise _Frozen("the decision is a direction, not task weights: run this method wrapped")
    weights = decision.weights
    return weights.tolist() if isinstance(weights, torch.Tensor) else [float(w) for w in weights]


def batched_eligible(method: Method) -> bool:
    """Whether a method can be driven on the batch (weights from losses, norms or Gramian)."""
    return method.needs <= Needs.GRAMIAN


def run_batched(
    setting: Setting,
    methods: Mapping[str, Sequence[Method] | None],
    record_every: int,
    dtype: torch.dtype = torch.float32,
    checkpoint: Callable[[dict[str, MethodRun]], None] | None = None,
    checkpoint_every: int = 5_000,
) -> dict[str, MethodRun]:
    """Run every method of ``methods`` (``None``: the mean) from every start, on one batch.

    ``methods[name]`` holds one method object per start (their states stay apart).
    ``checkpoint`` is called with the runs so far every ``checkpoint_every`` steps.
    """
    names = list(methods)
    num_starts = len(setting.starts)
    x = torch.tensor(setting.starts, dtype=dtype).repeat(len(names), 1).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=setting.lr)
    # A method's own learned parameters (UW's log-variances) get the same Adam as the points.
    own = [p for objs in methods.values() for m in objs or () for p in _own_parameters(m)]
    own_optimizer = torch.optim.Adam(own, lr=setting.lr) if own else None
    runs = {name: MethodRun(name, "batched") for name in names}
    weights = [[0.5, 0.5] for _ in range(x.shape[0])]
    frozen: dict[int, torch.Tensor] = {}  # point index -> where it stopped
    shared_seconds = 0.0
    recorded = set(recorded_steps(setting.steps, record_every))

    def freeze(m: int, s: int, step: int, why: str) -> None:
        i = m * num_starts + s
        frozen[i], weights[i] = before[i].clone(), [0.0, 0.0]
        failure = f"start {setting.starts[s]}, step {step}: {why}"
        runs[names[m]].failure = "; ".join(filter(None, [runs[names[m]].failure, failure]))

    for step in range(setting.steps + 1):
        if step in recorded:
            points = x.detach().view(len(names), num_starts, 2).tolist()
            for name, run in runs.items():
                run.trajectory.append(points[names.index(name)])
                run.recorded_steps.append(step)
        if step == setting.steps:
            break
        if checkpoint is not None and step and step % checkpoint_every == 0:
            checkpoint(_with_shared_share(runs, shared_seconds))
        started = time.thread_time()
        before = x.detach().clone()
        # float64 derivatives of the float32 points: the exact Jacobian, rounded once
        losses, jacobians = toy_losses_and_jacobians(before.double(), setting.scale)
        gramians = (jacobians @ jacobians.mT).tolist()
        jacobians = jacobians.to(dtype)
        loss_rows = (losses.double() + torch.tensor(setting.loss_offsets)).tolist()
        shared_seconds += time.thread_time() - started

        for m, name in enumerate(names):
            if methods[name] is None:
                continue
            started = time.thread_time()
            for s, method in enumerate(methods[name]):
                i = m * num_starts + s
                if i in frozen:
                    continue
                try:
                    decision = method.decide(_stats(method.needs, loss_rows[i], gramians[i]))
                    w = _weights_of(decision)
                    if not all(math.isfinite(v) for v in w):
                        raise _Frozen(f"non-finite weights {w}")
                except Exception as error:  # recorded; the other points go on
                    freeze(m, s, step, f"{type(error).__name__}: {error}")
                    continue
                for parameter, grad in (decision.parameter_grads or {}).items():
                    # A tensor, or Python floats (as UW's): in the parameter's dtype.
                    parameter.grad = torch.as_tensor(grad, dtype=parameter.dtype).reshape(
                        parameter.shape
                    )
                method.commit(decision.state)
                weights[i] = w
            runs[name].seconds += time.thread_time() - started

        started = time.thread_time()
        w = torch.tensor(weights, dtype=jacobians.dtype)
        x.grad = (w.unsqueeze(-1) * jacobians).sum(dim=1)
        optimizer.step()
        if own_optimizer is not None:
            own_optimizer.step()
            own_optimizer.zero_grad()
        finite = torch.isfinite(x.detach()).all(dim=1).tolist()
        for i, ok in enumerate(finite):
            if not ok and i not in frozen:
                freeze(i // num_starts, i % num_starts, step, "the point became non-finite")
        with torch.no_grad():  # Adam's momentum would move a frozen point on
            for i, position in frozen.items():
                x[i] = position
        shared_seconds += time.thread_time() - started

    return _with_shared_share(runs, shared_seconds)


def _with_shared_share(runs: dict[str, MethodRun], shared_seconds: float) -> dict[str, MethodRun]:
    """The runs with each method's equal share of the batch's common work added to its time."""
    share = shared_seconds / len(runs)
    return {name: replace(run, seconds=run.seconds + share) for name, run in runs.items()}


def _own_parameters(method: Method) -> list[torch.Tensor]:
    return list(method.parameters()) if hasattr(method, "parameters") else []


def _stats(needs: Needs, losses: list[float], gramian: list[list[float]]) -> TaskStats:
    if needs >= Needs.GRAMIAN:
        return TaskStats(tuple(losses), gramian_rows=gramian)
    if needs >= Needs.NORMS:
        return TaskStats(tuple(losses), squared_norms=(gramian[0][0], gramian[1][1]))
    return TaskStats(tuple(losses))


def run_wrapper(setting: Setting, name: str, entry, record_every: int,
                dtype: torch.dtype = torch.float32) -> MethodRun:  # fmt: skip
    """Run one method from every start through the library's training step."""
    run = MethodRun(name, "wrapper", recorded_steps=recorded_steps(setting.steps, record_every))
    recorded = set(run.recorded_steps)
    points = []
    for start in setting.starts:
        x = torch.tensor(start, dtype=dtype).requires_grad_(True)
        step_fn = entry.training_step(torch.optim.Adam([x], lr=setting.lr), [x], 2)
        path, started = [], time.thread_time()
        try:
            for step in range(setting.steps + 1):
                if step in recorded:
                    path.append(x.detach().tolist())
                if step == setting.steps:
                    break
                losses = toy_losses(x.unsqueeze(0), setting.scale)[0]
                offsets = setting.loss_offsets
                step_fn.zero_grad()
                step_fn.backward([loss + c for loss, c in zip(losses, offsets, strict=True)])
                step_fn.step()
                if not bool(torch.isfinite(x).all()):
                    raise _Frozen("the point became non-finite")
        except Exception as error:  # recorded, the other starts go on
            run.failure = f"start {start}, step {step}: {type(error).__name__}: {error}"
            path += [path[-1]] * (len(run.recorded_steps) - len(path))  # frozen there
        run.seconds += time.thread_time() - started
        points.append(path)
    run.trajectory = [list(record) for record in zip(*points, strict=True)]
    return run
