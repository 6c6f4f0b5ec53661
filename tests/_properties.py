"""Property asserts shared by the tests of every gradient-combination method.

Each takes ``combine(grads, orders) -> Tensor[P]``: a method with its randomness pinned by
explicit projection orders, so that properties can be checked exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Combine = Callable[[Tensor, Tensor], Tensor]


def tolerance(grads: Tensor) -> dict[str, float]:
    scale = float(grads.abs().max()) if grads.numel() else 1.0
    return {"rtol": 1e-9, "atol": 1e-9 * max(scale, 1.0)}


def assert_finite(combine: Combine, grads: Tensor, orders: Tensor) -> None:
    assert torch.isfinite(combine(grads, orders)).all()


def assert_linear_under_scaling(combine: Combine, grads: Tensor, orders: Tensor, c: float) -> None:
    expected = c * combine(grads, orders)
    torch.testing.assert_close(combine(c * grads, orders), expected, **tolerance(c * grads))


def assert_permutation_invariant(
    combine: Combine, grads: Tensor, orders: Tensor, permutation: Tensor
) -> None:
    """Relabelling the tasks (and their projection orders alike) changes nothing."""
    inverse = torch.argsort(permutation)
    permuted_orders = inverse[orders[permutation]]
    torch.testing.assert_close(
        combine(grads[permutation], permuted_orders), combine(grads, orders), **tolerance(grads)
    )


def assert_plain_when_no_conflict(combine: Combine, grads: Tensor, orders: Tensor, reduce) -> None:
    assert (grads @ grads.T >= 0).all(), "precondition: no conflicting pair"
    torch.testing.assert_close(combine(grads, orders), reduce(grads), **tolerance(grads))
