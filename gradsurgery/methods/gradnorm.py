"""GradNorm (Chen et al. 2018): task weights that balance gradient norms at a shared layer."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .._info import GradNormInfo
from .._validation import check_choice, check_num_tasks, check_real
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._losses import require_positive
from ._adam import Adam

__all__ = ["GradNorm"]

_TINY = sys.float_info.min  # the smallest normal float64: a guard, L(0) > 0 is checked


class GradNorm(Method):
    """GradNorm task weighting (Chen et al. 2018).

    Learns one weight ``w_i`` per task so that the norms ``G_i = w_i ||grad_W L_i||`` of the
    weighted task gradients at the shared parameters ``W`` move toward ``mean(G) * r_i^alpha``,
    where ``r_i = Lt_i / mean(Lt)`` is task ``i``'s relative inverse training rate and
    ``Lt_i = L_i(t) / L_i(0)`` its loss ratio: tasks that learn slower get larger gradients.
    The GradNorm loss ``sum_i |G_i - target_i|`` moves only the weights, with an Adam of its
    own; the network descends ``sum_i w_i L_i`` with the weights after the update. Since
    ``||grad_W L_i||`` does not depend on ``w``, the weights' gradient is analytic: no double
    backward, no second forward pass.

    Parameters
    ----------
    alpha : float
        Asymmetry (default 1.5); ``0`` balances the norms equally.
    lr : float
        Learning rate of the weights' Adam (default 0.01).
    parametrization : {"softmax", "renormalize"}
        ``"softmax"`` (default): ``w = T * softmax(log_w)``, always positive and summing to
        ``T``. ``"renormalize"``: the paper's raw weights, clamped positive and rescaled to sum
        to ``T`` after each step.
    num_tasks : int, optional
        ``T``; fixed by the first step when ``None``.

    Notes
    -----
    The loss ratios need positive losses at the step that records ``L(0)`` and non-negative
    ones after; other losses are refused (a loss with a known lower bound ``b`` can be passed
    as ``loss - b + eps``).
    """

    needs = Needs.NORMS
    info_class = GradNormInfo

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.01,
        parametrization: str = "softmax",
        num_tasks: int | None = None,
    ) -> None:
        self.alpha = check_real("alpha", alpha, low=0.0)
        self.lr = check_real("lr", lr, low=0.0, low_open=True)
        self.parametrization = check_choice(
            "parametrization", parametrization, ("softmax", "renormalize")
        )
        self.num_tasks = None if num_tasks is None else check_num_tasks(num_tasks)
        self._raw: list[float] | None = None  # log-weights (softmax) or raw weights
        self._current: list[float] | None = None  # the weights of _raw, kept: read every step
        self._adam: Adam | None = None
        self.initial_losses: torch.Tensor | None = None
        if num_tasks is not None:
            self._set(*self._initial_state(num_tasks))

    @property
    def weights(self) -> list[float] | None:
        """Current task weights (``None`` before the task count is known)."""
        return self._current

    def decide(self, stats: TaskStats) -> Decision:
        num_tasks, values, norms = stats.num_tasks, list(stats.losses), list(stats.grad_norms)
        raw, adam, old_weights = self._raw, self._adam, self._current
        if raw is None or adam is None or old_weights is None:
            raw, adam = self._initial_state(num_tasks)
            old_weights = self._weights(raw)
        # The loss ratios L(t) / L(0) need positive initial losses and non-negative later ones:
        # a negative ratio has no real power r^alpha, a zero L(0) no ratio at all.
        if self.initial_losses is None:
            require_positive(values, "GradNorm (its loss ratios L(t) / L(0))")
            initial = values
        else:
            require_positive(values, "GradNorm (its loss ratios L(t) / L(0))", zero=True)
            initial = self.initial_losses.tolist()
        loss_ratios = [v / max(v0, _TINY) for v, v0 in zip(values, initial, strict=True)]
        weighted_norms = [w * n for w, n in zip(old_weights, norms, strict=True)]
        mean_ratio, mean_norm = sum(loss_ratios) / num_tasks, sum(weighted_norms) / num_tasks
        # Every loss at zero: the ratios are all equal, so every relative rate is 1.
        rates = [r / mean_ratio if mean_ratio > 0 else 1.0 for r in loss_ratios]
        targets = [mean_norm * rate**self.alpha for rate in rates]
        gradnorm_loss = sum(abs(g - t) for g, t in zip(weighted_norms, targets, strict=True))
        # d/dw_i sum_j |w_j n_j - target_j| = sign(w_i n_i - target_i) n_i (targets held fixed)
        gradient = [
            _sign(w * n - t) * n for w, n, t in zip(old_weights, norms, targets, strict=True)
        ]
        if self.parametrization == "softmax":  # w = T softmax(theta): the chain rule
            mean = sum(a * w for a, w in zip(gradient, old_weights, strict=True)) / num_tasks
            gradient = [w * (a - mean) for a, w in zip(gradient, old_weights, strict=True)]
        raw, adam = adam.step(raw, gradient)
        if self.parametrization == "renormalize":
            raw = [max(r, 1e-8) for r in raw]
            total = sum(raw)
            raw = [r * (num_tasks / total) for r in raw]
        new_weights = self._weights(raw)
        return Decision(
            new_weights,
            state=(raw, adam, new_weights, initial),
            extras={
                "weighted_grad_norms": weighted_norms,
                "targets": targets,
                "loss_ratios": loss_ratios,
                "gradnorm_loss": gradnorm_loss,
                "weight_gradient": gradient,
            },
        )

    def commit(self, state: Any) -> None:
        raw, adam, self._current, initial = state
        self._raw, self._adam = raw, adam
        if self.initial_losses is None:
            self.initial_losses = torch.tensor(initial, dtype=torch.float64)

    def reset(self) -> None:
        """Forget ``L_i(0)``: the next step takes its losses as the new initial losses."""
        self.initial_losses = None

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        if self._raw is not None and len(self._raw) != num_tasks:
            raise ValueError(f"expected {len(self._raw)} losses (one per task), got {num_tasks}")

    def state_dict(self) -> dict[str, Any]:
        """Weights, ``L(0)`` and the state of the weights' Adam."""
        return {
            "parametrization": self.parametrization,
            "raw_weights": None
            if self._raw is None
            else torch.tensor(self._raw, dtype=torch.float64),
            "initial_losses": None if self.initial_losses is None else self.initial_losses.clone(),
            "optimizer": None if self._adam is None else self._adam.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; all of it is checked before anything changes."""
        missing = {"parametrization", "raw_weights", "initial_losses", "optimizer"} - set(
            state_dict
        )
        if missing:
            raise ValueError(f"not a GradNorm state_dict: missing {sorted(missing)}")
        if state_dict["parametrization"] != self.parametrization:
            raise ValueError(
                f"state_dict is for parametrization {state_dict['parametrization']!r}, "
                f"this GradNorm uses {self.parametrization!r}"
            )
        raw, initial = state_dict["raw_weights"], state_dict["initial_losses"]
        if raw is None:  # saved before the first step
            self._raw = self._adam = self._current = self.initial_losses = None
            if self.num_tasks is not None:
                self._set(*self._initial_state(self.num_tasks))
            return
        size = self.num_tasks or raw.numel()
        if raw.shape != (size,) or not bool(torch.isfinite(raw).all()):
            raise ValueError(f"state_dict has {raw.numel()} task weights, expected {size} finite")
        if initial is not None and (
            initial.shape != (size,) or not bool(torch.isfinite(initial).all())
        ):
            raise ValueError(
                f"state_dict has initial losses of shape {tuple(initial.shape)}, expected ({size},)"
            )
        adam = Adam.from_state_dict(state_dict["optimizer"], size)
        self._set(raw.detach().to(torch.float64).tolist(), adam)
        self.initial_losses = (
            None if initial is None else initial.detach().to(torch.float64).clone()
        )

    def _set(self, raw: list[float], adam: Adam) -> None:
        self._raw, self._adam, self._current = raw, adam, self._weights(raw)

    def _initial_state(self, num_tasks: int) -> tuple[list[float], Adam]:
        return [0.0 if self.parametrization == "softmax" else 1.0] * num_tasks, Adam(
            num_tasks, self.lr
        )

    def _weights(self, raw: list[float]) -> list[float]:
        if self.parametrization == "renormalize":
            return list(raw)
        top = max(raw)
        exp = [math.exp(r - top) for r in raw]
        total = sum(exp)
        return [len(raw) * e / total for e in exp]

    def __repr__(self) -> str:
        return (
            f"GradNorm(alpha={self.alpha}, lr={self.lr}, parametrization={self.parametrization!r})"
        )


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
