"""Adam on a few Python floats, with torch.optim.Adam's exact update (no weight decay)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .._validation import check_real


class Adam:
    """Adam for ``T`` task weights, written out because a ``torch.optim.Adam`` step costs more
    than the rest of a weighting's update. ``step`` returns the new values and a new state
    instead of mutating, so a refused step can simply drop them."""

    __slots__ = ("betas", "eps", "exp_avg", "exp_avg_sq", "lr", "steps")

    def __init__(
        self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.lr = check_real("lr", lr, low=0.0, low_open=True)
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.exp_avg = [0.0] * size
        self.exp_avg_sq = [0.0] * size

    def step(self, param: list[float], grad: list[float]) -> tuple[list[float], Adam]:
        beta1, beta2 = self.betas
        new = Adam.__new__(Adam)  # copy.copy costs more than the update itself
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
            "exp_avg": torch.tensor(self.exp_avg, dtype=torch.float64),
            "exp_avg_sq": torch.tensor(self.exp_avg_sq, dtype=torch.float64),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], size: int) -> Adam:
        """A validated copy of a :meth:`state_dict` (raises ``ValueError``; changes nothing)."""
        fields = {"lr", "betas", "eps", "step", "exp_avg", "exp_avg_sq"}
        missing = fields - set(state) if isinstance(state, Mapping) else fields
        if missing:
            raise ValueError(
                f"not a weight-optimizer state (missing {sorted(missing)}): was it saved by "
                "another version of gradsurgery?"
            )
        adam = cls(size, state["lr"])
        betas = tuple(float(b) for b in state["betas"])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {state['betas']!r}")
        adam.betas = (betas[0], betas[1])
        adam.eps = check_real("eps", state["eps"], low=0.0)
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        adam.steps = step
        adam.exp_avg = _vector(state["exp_avg"], size, "exp_avg")
        adam.exp_avg_sq = _vector(state["exp_avg_sq"], size, "exp_avg_sq")
        return adam


def _vector(values: Any, size: int, name: str) -> list[float]:
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if tensor.shape != (size,) or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must hold {size} finite numbers, got {values!r}")
    return tensor.tolist()
