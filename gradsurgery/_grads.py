"""Writing ``.grad`` as ``backward()`` would: accumulated, once per step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulate_grads", "all_finite", "fresh_all_finite"]


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add ``grads[k]`` (of ``params[k]``'s shape, or flattened) into ``params[k].grad``, as
    ``backward`` would.

    The tensors in ``grads`` must be fresh ones the caller gives away: empty ``.grad`` slots
    take them (as views) rather than copies.
    """
    existing_params, existing_grads = [], []
    for p, g in zip(params, grads, strict=True):
        if g.shape != p.shape:  # a view op per parameter costs more than this test
            g = g.view_as(p)
        if p.grad is None:
            p.grad = g
        else:
            existing_params.append(p.grad)
            existing_grads.append(g)
    if existing_params:
        torch._foreach_add_(existing_params, existing_grads)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one device sync.

    NaN and Inf survive a sum, so one reduction clears the usual case; only a non-finite sum
    (a real NaN or Inf, or finite values whose sum overflows) pays for the elementwise test.
    Pieces of one vector (a combination split per parameter) are summed as that vector.
    """
    if not tensors:
        return True
    base = tensors[0]._base
    if (
        base is not None
        and base.dim() == 1
        and all(t._base is base for t in tensors)
        and sum(t.numel() for t in tensors) == base.numel()
    ):
        parts: Sequence[Tensor] = [base]
    else:
        parts = tensors
    total = parts[0].sum() if len(parts) == 1 else torch.stack([t.sum() for t in parts]).sum()
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(t).all()) for t in parts)


def fresh_all_finite(tensors: Sequence[Tensor]) -> bool:
    """:func:`all_finite` for fresh floating-point tensors that nobody else holds (the outputs of
    ``torch.autograd.grad`` without a graph), in one fused kernel.

    The kernel is GradScaler's check, which also multiplies its tensors in place, here by 1
    (bit for bit the same values): hence fresh, contiguous tensors only (an expanded one, a
    scalar's gradient broadcast, takes the per-tensor check). A reduction per tensor costs more
    than the rest of a loss weighting's bookkeeping.
    """
    if (
        len(tensors) < 2
        or not _FUSED_CHECK
        or any(
            t.device != tensors[0].device or not t.is_floating_point() or not t.is_contiguous()
            for t in tensors
        )
    ):
        return all_finite(tensors)
    device = tensors[0].device
    found = torch.zeros(1, device=device)
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, one)
    return not found.item()


_FUSED_CHECK = hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
_ONES: dict[torch.device, Tensor] = {}  # the check's scale of 1, read only, one per device
