"""GradDrop (Chen et al. 2020): gradient sign dropout, coordinate by coordinate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["graddrop"]


def graddrop(
    grads: Tensor,
    *,
    leak: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    r"""Combine per-task gradients with Gradient Sign Dropout (Chen et al. 2020, Alg. 1).

    Each coordinate :math:`k` keeps either its positive or its negative task gradients: with
    the sign purity

    .. math:: \mathcal P_k = \tfrac12 \Big(1 + \frac{\sum_i g_{ik}}{\sum_i |g_{ik}|}\Big),

    and :math:`U_k` uniform on :math:`[0, 1)`, the positive entries survive when
    :math:`\mathcal P_k > U_k`, the negative ones otherwise. Task :math:`i`'s dropped entries
    still leak through with weight :math:`\ell_i`:

    .. math:: d_k = \sum_i \big(\ell_i + (1 - \ell_i) M_{ik}\big)\, g_{ik} .

    A coordinate where every task agrees in sign keeps all of them, so without conflicts the
    result is the plain sum. A coordinate where every gradient is zero gives zero. (The
    paper's masks, :math:`\mathcal P_k > U_k` for the positive entries and
    :math:`\mathcal P_k < U_k` for the negative ones, drop both where :math:`\mathcal P_k =
    U_k`, which a float draw can hit: an all-negative coordinate, :math:`\mathcal P_k = 0`,
    when :math:`U_k = 0`. Here such a coordinate keeps its negative entries.)

    Parameters
    ----------
    grads : Tensor
        Per-task gradients, ``[T, P]``.
    leak : float or sequence of float
        Leak of every task (one number) or of each task (``T`` numbers), in ``[0, 1]``; 0 (the
        default) drops fully, 1 gives the plain sum.
    generator : torch.Generator, optional
        Source of ``U``; the global generator when ``None``. ``U`` is drawn on the generator's
        device, in ``grads``' dtype (float32 at least).
    uniform : Tensor, optional
        ``[P]`` values of ``U`` to use instead of drawing them.

    Returns
    -------
    Tensor
        ``[P]`` update, in ``grads``' dtype and on its device.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import graddrop
    >>> grads = torch.tensor([[1.0, 2.0], [-3.0, 1.0]])
    >>> graddrop(grads, uniform=torch.tensor([0.5, 0.5]))   # purity 0.25 and 1
    tensor([-3.,  3.])
    >>> graddrop(grads, leak=1.0, uniform=torch.tensor([0.5, 0.5]))
    tensor([-2.,  3.])
    """
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1:
        shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"grads must be a [T, P] tensor with T >= 1, got {shape}")
    if not grads.is_floating_point():
        raise TypeError(f"grads must have a float dtype, got {grads.dtype}")
    leaks = check_leak(leak, grads.shape[0])
    dtype = torch.promote_types(grads.dtype, torch.float32)
    if uniform is None:
        uniform = draw_uniform(grads.shape[1], dtype, generator)
    elif uniform.shape != (grads.shape[1],):
        raise ValueError(f"uniform must have shape [{grads.shape[1]}], got {tuple(uniform.shape)}")
    return _graddrop(grads, leaks, uniform)


def check_leak(leak: float | Sequence[float], num_tasks: int | None) -> list[float]:
    """The leaks as a list (one entry, or ``T``), each finite and in ``[0, 1]``."""
    if isinstance(leak, Tensor):
        leak = leak.detach().cpu().tolist()
    values = np.atleast_1d(np.asarray(leak, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"leak must be a number or a sequence of numbers, got {leak!r}")
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"leak must be in [0, 1], got {leak!r}")
    if num_tasks is not None and values.size not in (1, num_tasks):
        raise ValueError(f"leak has {values.size} entries for {num_tasks} tasks")
    return values.tolist()


def draw_uniform(size: int, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """``U``: ``size`` uniform draws on the generator's device."""
    device = generator.device if generator is not None else None
    return torch.rand(size, generator=generator, dtype=dtype, device=device)


def _graddrop(grads: Tensor, leaks: list[float], uniform: Tensor) -> Tensor:
    # Each coordinate keeps all its positive or all its negative entries, so the update needs
    # only the columns' sums of positive and of negative entries: two passes over [T, P].
    work = grads.to(uniform.dtype)
    uniform = uniform.to(grads.device)
    positive = work.clamp(min=0)
    negative = work - positive
    positive_sums, negative_sums = positive.sum(dim=0), negative.sum(dim=0)
    totals = positive_sums + negative_sums  # sum_i g_ik
    # sum_i g_ik / sum_i |g_ik|: 0 / 0 (NaN) where every entry is zero, whose column then
    # keeps its negative sum, 0.
    purity = (totals / (positive_sums - negative_sums)).add_(1.0).mul_(0.5)
    # The negative entries survive wherever the positive ones do not: the paper's second mask,
    # P < U, would drop both signs where P == U (an all-negative column, P = 0, when U = 0).
    keep_positive = purity > uniform
    if len(leaks) == 1:
        leak = leaks[0]
        kept = _select(keep_positive, positive_sums, negative_sums)
        update = kept if leak == 0.0 else (1.0 - leak) * kept + leak * totals
    else:
        leak = torch.tensor(leaks, dtype=work.dtype, device=work.device)
        kept_positive = torch.mv(positive.T, 1.0 - leak)
        kept_negative = torch.mv(negative.T, 1.0 - leak)
        update = _select(keep_positive, kept_positive, kept_negative)
        update += torch.mv(work.T, leak)
    return update.to(grads.dtype)


def _select(mask: Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    """``torch.where(mask, if_true, if_false)`` for finite values, as a 0/1 blend.

    Exact (``x * 1 + y * 0 == x``) and two to three times faster on CPU, where ``torch.where``
    with a random mask runs element by element. Where a sum is not finite (an overflow of the
    column's sum), the coordinate is NaN whichever side is kept; the update pipeline refuses
    a step with a non-finite update.
    """
    keep = mask.to(if_true.dtype)
    return if_true * keep + if_false * (1.0 - keep)
