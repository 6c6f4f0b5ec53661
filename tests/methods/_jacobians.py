"""Jacobians that test a method's mathematics at its edges, shared by the peer comparisons.

Each case is ``(name, J)`` with ``J`` a float64 ``[T, P]`` matrix of task gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_PARAMS = 24


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_jacobian(num_tasks: int, seed: int, num_params: int = NUM_PARAMS) -> Tensor:
    return torch.randn(num_tasks, num_params, dtype=torch.float64, generator=_generator(seed))


def ill_conditioned(num_tasks: int, seed: int, condition: float = 1e4) -> Tensor:
    """Singular values spread evenly in log scale from 1 to ``1 / condition``."""
    g = _generator(seed)
    left, _ = torch.linalg.qr(torch.randn(num_tasks, num_tasks, dtype=torch.float64, generator=g))
    right, _ = torch.linalg.qr(torch.randn(NUM_PARAMS, num_tasks, dtype=torch.float64, generator=g))
    singular = torch.logspace(
        0, -torch.log10(torch.tensor(condition)).item(), num_tasks, dtype=torch.float64
    )
    return left @ torch.diag(singular) @ right.T


def rank_deficient(num_tasks: int, seed: int, rank: int, positive_mixing: bool = False) -> Tensor:
    """``A B`` with ``A`` ``[T, rank]``; with ``positive_mixing`` every row is a positive
    combination of the rows of ``B``, so no nonnegative combination of the rows is zero."""
    g = _generator(seed)
    mixing = torch.randn(num_tasks, rank, dtype=torch.float64, generator=g)
    if positive_mixing:
        mixing = mixing.abs() + 0.1
    return mixing @ torch.randn(rank, NUM_PARAMS, dtype=torch.float64, generator=g)


def cases(*, pareto_stationary: bool = True) -> list[tuple[str, Tensor]]:
    """The edge cases of the peer comparisons, T = 2..10.

    ``pareto_stationary=False`` leaves out the matrices where a nonnegative combination of the
    rows is zero (exactly opposite gradients, zero rows, rank-deficient mixtures of any sign).
    """
    result: list[tuple[str, Tensor]] = []
    for num_tasks in range(2, 11):
        result.append((f"random-T{num_tasks}", random_jacobian(num_tasks, num_tasks)))
        result.append((f"ill-T{num_tasks}", ill_conditioned(num_tasks, 100 + num_tasks)))
    for num_tasks in (3, 5, 8):
        result.append(
            (
                f"rank2-positive-T{num_tasks}",
                rank_deficient(num_tasks, 200 + num_tasks, 2, positive_mixing=True),
            )
        )
    g = random_jacobian(3, 7)
    result.append(("aligned-pair", torch.stack([g[0], 2.0 * g[0], g[1]])))
    result.append(("identical-pair", torch.stack([g[0], g[0]])))
    for scale in (1e-6, 1e6):
        result.append((f"scale-{scale:g}", scale * random_jacobian(4, 11)))
    if pareto_stationary:
        for num_tasks in (4, 8):
            result.append((f"rank2-T{num_tasks}", rank_deficient(num_tasks, 300 + num_tasks, 2)))
        result.append(("conflicting-pair", torch.stack([g[0], -g[0], g[1]])))
        result.append(("conflicting-scaled-pair", torch.stack([g[0], -3.0 * g[0]])))
        with_zero = random_jacobian(4, 13)
        with_zero[2] = 0.0
        result.append(("zero-row", with_zero))
        result.append(("all-zero", torch.zeros(3, NUM_PARAMS, dtype=torch.float64)))
    return result
