"""Writing ``.grad`` as ``backward()`` would: accumulated, once per step."""

from __future__ import annotations

import math
import threading
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
    (bit for bit the same values): hence fresh tensors only. Where the kernel refuses its input
    (an expanded tensor, a scalar's gradient broadcast; tensors on several devices) the
    per-tensor check answers. A reduction per tensor costs more than the rest of a loss
    weighting's bookkeeping, and so would a new flag tensor per call: each thread keeps one
    per device.
    """
    if len(tensors) < 2 or not _FUSED_CHECK:
        return all_finite(tensors)
    found, one = _check_buffers(tensors[0].device)
    found.zero_()
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    except (RuntimeError, NotImplementedError):  # multiplying by 1 changed nothing meanwhile
        return all_finite(tensors)
    return not found.item()


def _check_buffers(device: torch.device) -> tuple[Tensor, Tensor]:
    """This thread's flag and scale of 1 for the fused check on ``device``."""
    buffers = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = _THREAD.buffers = {}
    pair = buffers.get(device)
    if pair is None:
        pair = buffers[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
    return pair


_FUSED_CHECK = hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
_THREAD = threading.local()  # the fused check's buffers: a thread's own, never shared
