"""GradNorm (Chen et al. 2018): task weights that balance gradient norms at a shared layer."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ._distributed import Synchronizer, synchronizer
from ._engine import AutogradEngine, TaskJacobian, accumulate_grads, as_parameter_list, graph_leaves
from ._partition import BatchPartitionEngine
from ._validation import (
    NonFiniteError,
    check_losses,
    check_nonfinite_policy,
    check_num_tasks,
    loss_values,
    nonfinite_tasks,
    nonfinite_values,
)

_PARAMETRIZATIONS = ("softmax", "renormalize")


@dataclass(frozen=True)
class _FullJacobian:
    """Per-task gradients of every parameter the losses reach, ``W``'s first."""

    params: list[Tensor]
    jacobian: TaskJacobian


class GradNormInfo:
    """What one GradNorm update saw and did.

    Attributes
    ----------
    weights : Tensor
        ``[T]`` float64 task weights after the update (those the weighted backward used).
    grad_norms : Tensor
        ``[T]`` raw norms ``||grad_W L_i||`` at the shared parameters ``W``.
    weighted_grad_norms : Tensor
        ``[T]`` ``G_i = w_i ||grad_W L_i||`` with the weights before the update.
    targets : Tensor
        ``[T]`` target norms ``mean(G) * r_i^alpha``, with ``r_i`` the relative inverse
        training rate ``loss_ratios[i] / mean(loss_ratios)``.
    loss_ratios : Tensor
        ``[T]`` loss ratios ``L_i(t) / L_i(0)`` (the paper's inverse training rates).
    gradnorm_loss : float
        ``sum_i |G_i - target_i|`` before the update.
    weight_gradient : Tensor
        ``[T]`` gradient of the GradNorm loss with respect to the learned vector (the
        log-weights, or the raw weights with ``parametrization="renormalize"``).
    skipped : bool
        ``True`` when the weights were not updated (a non-finite loss or gradient).
    nonfinite_tasks : tuple of int
        Tasks whose loss or gradient held NaN or Inf.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> gn = gs.GradNorm(num_tasks=2, shared_parameters=[w], alpha=0.0)
    >>> info = gn.update_weights([(w**2).sum(), 3 * w.sum()])
    >>> info.grad_norms
    tensor([4.4721, 4.2426], dtype=torch.float64)
    >>> info.targets  # alpha = 0: every target is the mean norm
    tensor([4.3574, 4.3574], dtype=torch.float64)
    >>> bool(info.weights[0] < 1)  # task 0's norm is above target: its weight goes down
    True
    """

    __slots__ = (
        "_grad_norms",
        "_loss_ratios",
        "_targets",
        "_weight_gradient",
        "_weighted_grad_norms",
        "_weights",
        "gradnorm_loss",
        "nonfinite_tasks",
        "skipped",
    )

    def __init__(
        self,
        weights: Sequence[float],
        grad_norms: Sequence[float],
        weighted_grad_norms: Sequence[float],
        targets: Sequence[float],
        loss_ratios: Sequence[float],
        gradnorm_loss: float,
        weight_gradient: Sequence[float],
        *,
        skipped: bool = False,
        nonfinite_tasks: Sequence[int] = (),
    ) -> None:
        # T numbers each; the tensors are built when read, so a training loop that ignores
        # them does not pay for them.
        self._weights, self._grad_norms = weights, grad_norms
        self._weighted_grad_norms, self._targets = weighted_grad_norms, targets
        self._loss_ratios, self._weight_gradient = loss_ratios, weight_gradient
        self.gradnorm_loss = gradnorm_loss
        self.skipped = skipped
        self.nonfinite_tasks = tuple(nonfinite_tasks)

    @property
    def weights(self) -> Tensor:
        return _float64(self._weights)

    @property
    def grad_norms(self) -> Tensor:
        return _float64(self._grad_norms)

    @property
    def weighted_grad_norms(self) -> Tensor:
        return _float64(self._weighted_grad_norms)

    @property
    def targets(self) -> Tensor:
        return _float64(self._targets)

    @property
    def loss_ratios(self) -> Tensor:
        return _float64(self._loss_ratios)

    @property
    def weight_gradient(self) -> Tensor:
        return _float64(self._weight_gradient)

    def __repr__(self) -> str:
        return (
            f"GradNormInfo(weights={self.weights}, grad_norms={self.grad_norms}, "
            f"gradnorm_loss={self.gradnorm_loss:.4g}, skipped={self.skipped})"
        )


def _float64(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


class GradNorm:
    """GradNorm task weighting (Chen et al. 2018).

    Learns one weight ``w_i`` per task so that the norms ``G_i = ||grad_W (w_i L_i)||`` of the
    weighted task gradients at the shared parameters ``W`` move toward
    ``mean(G) * r_i^alpha``, where ``r_i = Lt_i / mean(Lt)`` is task ``i``'s relative inverse
    training rate and ``Lt_i = L_i(t) / L_i(0)`` its loss ratio: tasks that learn slower get
    larger gradients. The GradNorm loss
    ``sum_i |G_i - target_i|`` moves only the task weights, with an Adam of its own; the
    network is trained on ``sum_i w_i L_i`` by the user's optimizer.

    Since ``G_i = w_i ||grad_W L_i||`` and the norm does not depend on ``w``, one backward per
    task to ``W`` (no double backward) and one weighted backward (no second forward) suffice.

    Parameters
    ----------
    num_tasks : int
        ``T``.
    shared_parameters : module or iterable of Tensor
        ``W``: the shared layer whose gradient norms are balanced (the paper uses the last
        shared layer).
    alpha : float
        Asymmetry (default 1.5); ``0`` balances the norms equally.
    lr : float
        Learning rate of the weights' Adam (default 0.01).
    parametrization : {"softmax", "renormalize"}
        ``"softmax"`` (default): ``w = T * softmax(log_w)``, always positive and summing to
        ``T``. ``"renormalize"``: the paper's raw weights, clamped positive and rescaled to sum
        to ``T`` after each step.
    nonfinite : {"raise", "skip"}
        What a NaN or Inf in a loss or gradient does: raise :class:`NonFiniteError` (default),
        or skip the call (weights and ``.grad`` untouched), reported as ``info.skipped``.
    engine : BatchPartitionEngine, optional
        How the per-task gradients are computed. By default one autograd call per task down to
        ``W`` plus one weighted backward; with a :class:`BatchPartitionEngine`, a single
        backward pass gives every task's gradient and their weighted sum.
    distributed : bool, optional
        Average the per-task gradients and losses over the processes of ``process_group``
        (one all-reduce per step), so that the weights, ``L(0)`` and the written gradient are
        those of the global batch and identical on every process. ``None`` (default): whenever
        torch.distributed is initialized with more than one process.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over; the default group when ``None``.

    Examples
    --------
    >>> import torch
    >>> import gradsurgery as gs
    >>> _ = torch.manual_seed(0)
    >>> body, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    >>> optimizer = torch.optim.SGD([*body.parameters(), *heads.parameters()], lr=0.1)
    >>> gn = gs.GradNorm(num_tasks=2, shared_parameters=body, alpha=1.5, lr=0.01)
    >>> out = heads(torch.relu(body(torch.randn(16, 4))))
    >>> losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()]
    >>> optimizer.zero_grad()
    >>> info = gn.backward(losses)
    >>> optimizer.step()
    >>> round(float(gn.weights.sum()), 4)
    2.0
    """

    def __init__(
        self,
        num_tasks: int,
        shared_parameters: Iterable[Tensor] | torch.nn.Module,
        *,
        alpha: float = 1.5,
        lr: float = 0.01,
        parametrization: str = "softmax",
        nonfinite: str = "raise",
        engine: BatchPartitionEngine | None = None,
        distributed: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        self.shared_parameters = as_parameter_list(shared_parameters, "shared_parameters")
        if parametrization not in _PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization must be one of {_PARAMETRIZATIONS}, got {parametrization!r}"
            )
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.parametrization = parametrization
        self.nonfinite = check_nonfinite_policy(nonfinite)
        self.engine = engine if engine is not None else AutogradEngine()
        self.distributed = distributed
        self.process_group = process_group
        # The learned vector: log-weights (softmax) or raw weights (renormalize). T Python
        # floats (float64): exact and identical across devices and processes, and for so few
        # numbers plain arithmetic costs less than NumPy or torch calls.
        self._raw = [0.0 if parametrization == "softmax" else 1.0] * num_tasks
        self._current_weights = self._weights(self._raw)
        self._adam = _Adam(num_tasks, lr=lr)
        self.initial_losses: Tensor | None = None

    @property
    def weights(self) -> Tensor:
        """Current task weights, shape ``[T]``, positive and summing to ``T`` (a copy)."""
        return _float64(self._current_weights)

    @property
    def lr(self) -> float:
        """Learning rate of the weights' Adam."""
        return self._adam.lr

    def reset(self) -> None:
        """Forget ``L_i(0)``: the next update takes its losses as the new initial losses."""
        self.initial_losses = None

    def update_weights(
        self, losses: Sequence[Tensor], *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> GradNormInfo:
        """Update the task weights from ``losses``; the model's ``.grad`` is not touched.

        The autograd graph of ``losses`` is kept, so the caller can still backward through it.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Mixed precision: the gradient norms are taken on scaled losses and unscaled.

        Returns
        -------
        GradNormInfo
        """
        return self._update(losses, grad_scaler, weighted_backward=False)

    def backward(
        self, losses: Sequence[Tensor], *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> GradNormInfo:
        """Update the task weights, then add ``sum_i w_i grad L_i`` to the parameters' ``.grad``.

        The weights are those after the update. Equals the reference procedure (GradNorm step,
        second forward pass, weighted backward) without the second forward pass. Like
        ``loss.backward()`` it accumulates into ``.grad`` of every parameter the losses reach,
        and frees the graph.

        Parameters
        ----------
        losses : sequence of Tensor
            One scalar loss per task.
        grad_scaler : torch.amp.GradScaler, optional
            Mixed precision: the weighted loss is scaled; a gradient overflow is left in
            ``.grad`` (weights not updated) for ``grad_scaler.step`` to skip.

        Returns
        -------
        GradNormInfo
        """
        return self._update(losses, grad_scaler, weighted_backward=True)

    def state_dict(self) -> dict[str, Any]:
        """Weights, ``L(0)`` and the state of the weights' Adam."""
        return {
            "parametrization": self.parametrization,
            "raw_weights": _float64(self._raw),
            "initial_losses": None if self.initial_losses is None else self.initial_losses.clone(),
            "optimizer": self._adam.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        if state_dict.get("parametrization") != self.parametrization:
            raise ValueError(
                f"state_dict is for parametrization {state_dict.get('parametrization')!r}, "
                f"this GradNorm uses {self.parametrization!r}"
            )
        raw = state_dict["raw_weights"]
        if raw.shape != (self.num_tasks,):
            raise ValueError(
                f"state_dict has {raw.numel()} task weights, expected {self.num_tasks}"
            )
        self._adam.load_state_dict(state_dict["optimizer"])
        self._raw = raw.detach().to(torch.float64).tolist()
        self._current_weights = self._weights(self._raw)
        initial = state_dict["initial_losses"]
        self.initial_losses = None if initial is None else initial.clone()

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.3f}" for w in self.weights.tolist())
        return f"GradNorm(num_tasks={self.num_tasks}, alpha={self.alpha}, weights=[{weights}])"

    # -- internals ---------------------------------------------------------------------------
    def _weights(self, raw: list[float]) -> list[float]:
        if self.parametrization == "softmax":
            top = max(raw)
            exp = [math.exp(r - top) for r in raw]
            total = sum(exp)
            return [self.num_tasks * e / total for e in exp]
        return list(raw)

    def _raw_gradient(
        self, weights: list[float], norms: list[float], targets: list[float]
    ) -> list[float]:
        """Gradient of ``sum_i |w_i n_i - target_i|`` with respect to the learned vector.

        ``G_i = w_i n_i`` with ``n_i = ||grad_W L_i||`` independent of ``w``, so the gradient
        is analytic: no double backward through the network is ever needed.
        """
        d_weights = [_sign(w * n - t) * n for w, n, t in zip(weights, norms, targets, strict=True)]
        if self.parametrization == "renormalize":
            return d_weights
        # w = T softmax(theta): dL/dtheta_j = w_j (a_j - sum_i a_i w_i / T), a = dL/dw.
        mean = sum(a * w for a, w in zip(d_weights, weights, strict=True)) / self.num_tasks
        return [w * (a - mean) for a, w in zip(d_weights, weights, strict=True)]

    def _update(
        self,
        losses: Sequence[Tensor],
        grad_scaler: torch.amp.GradScaler | None,
        *,
        weighted_backward: bool,
    ) -> GradNormInfo:
        losses = check_losses(losses, self.num_tasks)
        values = loss_values(losses)
        sync = synchronizer(self.distributed, self.process_group)
        if sync is None:  # alone, refuse early; synchronized, every process decides together
            bad = nonfinite_values(values)
            if bad:
                return self._nonfinite(bad, "loss")

        scale = 1.0 if grad_scaler is None else float(grad_scaler.get_scale())
        scaled = losses if grad_scaler is None else [grad_scaler.scale(loss) for loss in losses]
        full, at_shared, values = self._jacobians(scaled, values, weighted_backward, sync)
        if sync is not None:
            bad = nonfinite_values(values)
            if bad:
                return self._nonfinite(bad, "loss")
        reaches_shared = None if at_shared.all_reached else at_shared.reached.any(axis=1)
        if reaches_shared is not None and not reaches_shared.all():
            unreached = np.flatnonzero(~reaches_shared).tolist()
            raise ValueError(
                f"the loss of task(s) {', '.join(map(str, unreached))} does not depend on the "
                "shared parameters, so GradNorm cannot balance it"
            )
        squared_norms = at_shared.squared_norms().tolist()
        norms = [math.sqrt(max(value, 0.0)) / scale for value in squared_norms]
        bad = nonfinite_values(norms)
        if not bad and full is not None:  # every other parameter, before anything changes
            bad = full.jacobian.nonfinite_tasks()
        if bad:
            if grad_scaler is None or not weighted_backward:
                return self._nonfinite(bad, "gradient")
            # An fp16 overflow: keep the weights and let the scaler skip this step.
            self._weighted_backward(scaled, self._current_weights, full)
            return self._nonfinite(bad, "gradient", raise_error=False)

        initial = values if self.initial_losses is None else self.initial_losses.tolist()
        # A task whose loss starts at 0 has no loss ratio; tiny keeps the ratio finite.
        loss_ratios = [v / max(v0, _TINY) for v, v0 in zip(values, initial, strict=True)]
        old_weights = self._current_weights
        weighted_norms = [w * n for w, n in zip(old_weights, norms, strict=True)]
        targets = _targets(weighted_norms, loss_ratios, self.alpha)
        gradnorm_loss = sum(abs(g - t) for g, t in zip(weighted_norms, targets, strict=True))
        raw_gradient = self._raw_gradient(old_weights, norms, targets)
        raw, adam = self._adam.step(self._raw, raw_gradient)
        if self.parametrization == "renormalize":
            raw = [max(r, 1e-8) for r in raw]
            total = sum(raw)
            raw = [r * (self.num_tasks / total) for r in raw]
        new_weights = self._weights(raw)

        if weighted_backward:
            try:
                self._weighted_backward(scaled, new_weights, full, check=grad_scaler is None)
            except NonFiniteError:
                if self.nonfinite == "raise":
                    raise
                return self._nonfinite([], "gradient", raise_error=False)
        # Commit only now: a refused call leaves the weights, L(0) and Adam untouched.
        self._raw, self._adam, self._current_weights = raw, adam, new_weights
        if self.initial_losses is None:
            self.initial_losses = _float64(initial)
        return GradNormInfo(
            new_weights, norms, weighted_norms, targets, loss_ratios, gradnorm_loss, raw_gradient
        )

    def _jacobians(
        self,
        losses: list[Tensor],
        values: list[float],
        weighted_backward: bool,
        sync: Synchronizer | None,
    ) -> tuple[_FullJacobian | None, TaskJacobian, list[float]]:
        """Per-task gradients at ``W``, and at every parameter when they are needed anyway.

        Every parameter's per-task gradients are taken when one backward pass gives them all
        (a single-backward engine), or when they must be synchronized across processes: then
        the weighted gradient is their combination, and one all-reduce covers everything.
        """
        full_needed = weighted_backward and (self.engine.single_backward or sync is not None)
        if not full_needed:
            at_shared = self.engine.jacobian(
                losses, self.shared_parameters, retain_graph=True, reuse=True
            )
            if sync is not None:
                at_shared, values = sync.all_reduce(at_shared, values)
            return None, at_shared, values
        # The Jacobians live only within this call: the engine may reuse their matrix.
        params, full = self.engine.reached_jacobian(losses, self.shared_parameters, reuse=True)
        if sync is not None:
            full, values = sync.all_reduce(full, values)
        # W's parameters come first: their gradients are the full Jacobian's leading columns.
        return _FullJacobian(params, full), full.leading(len(self.shared_parameters)), values

    def _weighted_backward(
        self,
        losses: list[Tensor],
        weights: list[float],
        full: _FullJacobian | None,
        *,
        check: bool = False,
    ) -> None:
        """Add ``grad sum_i w_i L_i`` to ``.grad`` of every parameter the losses reach."""
        if full is not None:  # the per-task gradients are all there: no second backward
            params, grads = full.params, full.jacobian.combine(weights)
            hit = None if full.jacobian.all_reached else full.jacobian.reached.any(axis=0)
            if hit is not None and not hit.all():  # as after backward(): unreached keep .grad
                params = [p for p, k in zip(params, hit, strict=True) if k]
                grads = [g for g, k in zip(grads, hit, strict=True) if k]
            # full.jacobian was checked finite before the weight update: nothing to check.
        else:
            weighted = sum(w * loss for w, loss in zip(weights, losses, strict=True))
            leaves = graph_leaves(losses)
            found = torch.autograd.grad(weighted, leaves, allow_unused=True)
            params = [p for p, g in zip(leaves, found, strict=True) if g is not None]
            grads = [g.reshape(-1) for g in found if g is not None]
            if check and nonfinite_tasks(torch.cat(grads)[None]):
                raise NonFiniteError(
                    "the weighted gradient sum_i w_i grad L_i holds NaN or Inf; nothing was changed"
                )
        accumulate_grads(params, grads)

    def _nonfinite(self, bad: list[int], what: str, *, raise_error: bool = True) -> GradNormInfo:
        if raise_error and self.nonfinite == "raise":
            raise NonFiniteError(
                f"the {what} of task(s) {', '.join(map(str, bad))} holds NaN or Inf; nothing was "
                "changed (pass nonfinite='skip' to skip such steps instead)"
            )
        nan = [math.nan] * self.num_tasks
        return GradNormInfo(
            self._current_weights,
            nan,
            nan,
            nan,
            nan,
            math.nan,
            nan,
            skipped=True,
            nonfinite_tasks=bad,
        )


class _Adam:
    """Adam for the task weights, with torch.optim.Adam's exact update (no weight decay).

    Written out because the weights are ``T`` Python floats: a ``torch.optim.Adam`` step costs
    more than the rest of the GradNorm update. ``step`` returns the new values and a new state
    instead of mutating, so a refused call can simply drop them.
    """

    def __init__(
        self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr, self.betas, self.eps = float(lr), betas, eps
        self.steps = 0
        self.exp_avg = [0.0] * size
        self.exp_avg_sq = [0.0] * size

    def step(self, param: list[float], grad: list[float]) -> tuple[list[float], _Adam]:
        beta1, beta2 = self.betas
        new = _Adam.__new__(_Adam)  # copy.copy costs more than the update itself
        new.lr, new.betas, new.eps = self.lr, self.betas, self.eps
        new.steps = self.steps + 1
        # torch's operations in torch's order; its kernels may fuse a multiply-add, so the
        # last bit can differ (tested to 1e-12).
        new.exp_avg = [m + (g - m) * (1 - beta1) for m, g in zip(self.exp_avg, grad, strict=True)]
        new.exp_avg_sq = [
            v * beta2 + (1 - beta2) * g * g for v, g in zip(self.exp_avg_sq, grad, strict=True)
        ]
        step_size = self.lr / (1 - beta1**new.steps)
        root_correction = math.sqrt(1 - beta2**new.steps)
        return [
            p - step_size * m / (math.sqrt(v) / root_correction + self.eps)
            for p, m, v in zip(param, new.exp_avg, new.exp_avg_sq, strict=True)
        ], new

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "step": self.steps,
            "exp_avg": _float64(self.exp_avg),
            "exp_avg_sq": _float64(self.exp_avg_sq),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"lr", "betas", "eps", "step", "exp_avg", "exp_avg_sq"} - state.keys()
        if missing:
            raise ValueError(
                f"not a GradNorm weight-optimizer state (missing {sorted(missing)}): was it "
                "saved by another version of gradsurgery?"
            )
        self.lr, self.betas, self.eps = state["lr"], tuple(state["betas"]), state["eps"]
        self.steps = int(state["step"])
        self.exp_avg = state["exp_avg"].tolist()
        self.exp_avg_sq = state["exp_avg_sq"].tolist()


_TINY = sys.float_info.min  # the smallest normal float64


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _targets(weighted_norms: list[float], loss_ratios: list[float], alpha: float) -> list[float]:
    """:func:`gradsurgery.functional.gradnorm_targets` on Python floats."""
    mean_ratio = sum(loss_ratios) / len(loss_ratios)
    mean_norm = sum(weighted_norms) / len(weighted_norms)
    return [mean_norm * (r / mean_ratio) ** alpha for r in loss_ratios]
