"""Pure functions on per-task gradients: the mathematics of gradsurgery without any state.

Everything here works on a matrix ``grads`` of shape ``[T, P]`` (one flattened gradient per
task) or on its Gramian ``grads @ grads.T`` of shape ``[T, T]``. PCGrad's projected gradients
are linear combinations of the original ones, so the whole surgery is computed on the small
Gramian (``O(T^3)`` work) after a single ``O(T^2 P)`` product, and applied to ``grads`` once.
"""

from __future__ import annotations

import bisect
import functools

import numpy as np
import torch
from torch import Tensor

from .._validation import check_reduction
from ._aligned_mtl import aligned_mtl_weights
from ._cagrad import cagrad_weights
from ._config import config_weights
from ._dbmtl import dbmtl_weights
from ._dualproj import dualproj_weights
from ._dwa import dwa_weights
from ._fairgrad import fairgrad_weights
from ._famo import famo_logit_gradient, famo_weights
from ._gls import gls_weights
from ._graddrop import graddrop
from ._gradvac import gradvac_weights
from ._imtl_l import imtl_l_scale_gradient, imtl_l_weights
from ._imtlg import imtlg_weights
from ._mgda import mgda_weights
from ._nash_mtl import nash_mtl_weights
from ._rlw import rlw_weights
from ._stch import stch_log_weights, stch_weights
from ._upgrad import upgrad_weights
from ._uw import uw_log_variance_gradient, uw_weights

__all__ = [
    "aligned_mtl_weights",
    "cagrad_weights",
    "config_weights",
    "conflicting_pairs",
    "cosine_similarity_matrix",
    "dbmtl_weights",
    "dualproj_weights",
    "dwa_weights",
    "fairgrad_weights",
    "famo_logit_gradient",
    "famo_weights",
    "gls_weights",
    "graddrop",
    "gradnorm_loss",
    "gradnorm_targets",
    "gradvac_weights",
    "gramian",
    "imtl_l_scale_gradient",
    "imtl_l_weights",
    "imtlg_weights",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_coefficients",
    "projection_orders",
    "rlw_weights",
    "stch_log_weights",
    "stch_weights",
    "upgrad_weights",
    "uw_log_variance_gradient",
    "uw_weights",
]


def gramian(grads: Tensor) -> Tensor:
    """Gramian ``G = grads @ grads.T`` of per-task gradients.

    Half-precision inputs are promoted to float32 so that the dot products do not overflow.

    Parameters
    ----------
    grads : Tensor
        Per-task gradients, shape ``[T, P]``.

    Returns
    -------
    Tensor
        ``[T, T]`` matrix of dot products ``G[i, j] = g_i . g_j``.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import gramian
    >>> gramian(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
    tensor([[1., 1.],
            [1., 2.]])
    """
    _check_matrix(grads, "grads")
    if grads.dtype in (torch.float16, torch.bfloat16):
        grads = grads.float()
    return grads @ grads.T


def projection_orders(num_tasks: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw, for every task ``i``, a fresh random order of the other tasks.

    Row ``i`` of the result is a uniformly random permutation of ``{0..T-1} \\ {i}``, the order
    in which PCGrad projects task ``i``'s gradient (Yu et al. 2020, Algorithm 1).

    Parameters
    ----------
    num_tasks : int
        ``T``.
    generator : torch.Generator, optional
        Source of randomness; the global generator when ``None``.

    Returns
    -------
    Tensor
        ``int64`` tensor of shape ``[T, T - 1]`` on the CPU.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import projection_orders
    >>> orders = projection_orders(3, generator=torch.Generator().manual_seed(0))
    >>> orders.shape
    torch.Size([3, 2])
    >>> all(i not in row.tolist() for i, row in enumerate(orders))
    True
    """
    return torch.from_numpy(_projection_orders(num_tasks, generator))


def _projection_orders(num_tasks: int, generator: torch.Generator | None) -> np.ndarray:
    keys = _order_keys(num_tasks, generator).numpy()
    np.fill_diagonal(keys, 2.0)  # task i sorts last, where it is dropped
    return np.argsort(keys, axis=1, kind="stable")[:, : num_tasks - 1]


def _order_keys(num_tasks: int, generator: torch.Generator | None) -> Tensor:
    # Sorting i.i.d. uniform keys gives a uniform permutation. One draw for all tasks keeps
    # the generator stream short and fixed.
    device = generator.device if generator is not None else None
    keys = torch.rand(num_tasks, num_tasks, generator=generator, dtype=torch.float64, device=device)
    return keys.cpu()


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> tuple[Tensor, Tensor]:
    """PCGrad's projected gradients as coefficients of the original gradients.

    Computes ``C`` such that the projected gradient of task ``i`` is
    ``g_i' = sum_k C[i, k] g_k``, following Algorithm 1 of Yu et al. (2020): for each task ``i``
    and each other task ``j`` in ``orders[i]``, if ``g_i' . g_j < 0`` then
    ``g_i' <- g_i' - (g_i' . g_j / ||g_j||^2) g_j``, always against the *original* ``g_j``.
    A zero gradient ``g_j`` never conflicts, so nothing is divided by zero.

    The work is done in float64 on the CPU: it is ``O(T^3)`` on a ``[T, T]`` matrix.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian of the per-task gradients (see :func:`gramian`).
    orders : Tensor
        ``[T, T - 1]`` projection orders (see :func:`projection_orders`).

    Returns
    -------
    coefficients : Tensor
        ``[T, T]`` float64 matrix ``C``.
    projected : Tensor
        ``[T, T]`` bool matrix, ``projected[i, j]`` when ``g_i`` was projected onto the normal
        plane of ``g_j``.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import pcgrad_coefficients
    >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]])
    >>> C, projected = pcgrad_coefficients(G, torch.tensor([[1], [0]]))
    >>> C
    tensor([[1.0000, 0.2500],
            [1.0000, 1.0000]], dtype=torch.float64)
    >>> projected
    tensor([[False,  True],
            [ True, False]])
    """
    _check_matrix(gramian, "gramian")
    num_tasks = gramian.shape[0]
    if gramian.shape != (num_tasks, num_tasks):
        raise ValueError(f"gramian must be square, got shape {tuple(gramian.shape)}")
    if orders.shape != (num_tasks, num_tasks - 1):
        raise ValueError(
            f"orders must have shape {(num_tasks, num_tasks - 1)}, got {tuple(orders.shape)}"
        )
    G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    coefficients, projected = _pcgrad_coefficients(G, orders.to("cpu", torch.long).numpy())
    return torch.from_numpy(coefficients), torch.from_numpy(projected)


# Up to this many tasks the surgery runs as plain Python on floats: for a [T, T] Gramian, a
# NumPy call costs more than the arithmetic it does until T is in the twenties (the lockstep
# NumPy loop makes about 15 calls per partner; the Python loop does T^3 / 2 products).
_PYTHON_MAX_TASKS = 16


def _pcgrad_coefficients(G: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if G.shape[0] <= _PYTHON_MAX_TASKS:
        return _pcgrad_coefficients_python(G, orders)
    return _pcgrad_coefficients_numpy(G, orders)


def _pcgrad_coefficients_numpy(G: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A [T, T] problem: NumPy float64 has far less per-operation overhead than torch for
    # matrices this small, and is exact enough to match a float64 direct loop.
    num_tasks = G.shape[0]
    squared_norms = G.diagonal()
    coefficients = np.eye(num_tasks)
    projected = np.zeros((num_tasks, num_tasks), dtype=bool)
    rows = np.arange(num_tasks)
    # All tasks advance through their own order in lockstep: step s projects every g_i' on
    # its s-th partner at once, so the Python loop runs T - 1 times, not T * (T - 1).
    for partners in orders.T:
        dots = (coefficients * G[partners]).sum(axis=1)  # g_i' . g_{partner(i)}; G symmetric
        partner_norms = squared_norms[partners]
        conflict = (dots < 0) & (partner_norms > 0)
        if conflict.any():
            coefficients[rows[conflict], partners[conflict]] -= (
                dots[conflict] / partner_norms[conflict]
            )
            projected[rows[conflict], partners[conflict]] = True
    return coefficients, projected


def _pcgrad_coefficients_python(G: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same surgery as the NumPy version, task by task on Python floats."""
    rows, projections = _python_surgery(G.tolist(), orders.tolist())
    return np.array(rows), _projection_matrix(projections, G.shape[0])


def _python_surgery(
    gram: list[list[float]], orders: list[list[int]]
) -> tuple[list[list[float]], list[tuple[int, int]]]:
    num_tasks = len(gram)
    rows, projections = [], []
    for i, order in enumerate(orders):
        row = [0.0] * num_tasks
        row[i] = 1.0
        terms = [i]  # where row is nonzero, in index order: the sum's order, as NumPy's
        for j in order:  # g_i' . g_j, with g_i' = sum_m row[m] g_m
            gram_j = gram[j]
            # Until a projection, g_i' = g_i: the dot product is the Gramian's, exactly.
            dot = gram_j[i] if len(terms) == 1 else sum([row[m] * gram_j[m] for m in terms])
            if dot < 0 and gram_j[j] > 0:
                row[j] -= dot / gram_j[j]
                bisect.insort(terms, j)
                projections.append((i, j))
        rows.append(row)
    return rows, projections


def _pcgrad_weights(
    gram: list[list[float]], generator: torch.Generator | None, reduction: str
) -> tuple[list[float], list[tuple[int, int]]]:
    """Draw the orders, do the surgery on the Gramian ``gram``, reduce: PCGrad's weights ``c``
    (one float per task) and the projections done, as ``(i, j)`` pairs. What PCGrad runs every
    step, with as few operations as it can: a training loop pays for every call here."""
    num_tasks = len(gram)
    if num_tasks > _PYTHON_MAX_TASKS:
        orders = _projection_orders(num_tasks, generator)
        coefficients, projected = _pcgrad_coefficients_numpy(np.array(gram), orders)
        weights = _reduce_coefficients(coefficients, reduction).tolist()
        # tolist() first: iterating a NumPy array's rows costs a call per element.
        return weights, list(map(tuple, np.argwhere(projected).tolist()))
    keys = _order_keys(num_tasks, generator)  # drawn even when unused: the same stream
    if min(map(min, gram)) >= 0:  # no conflict: nothing to project
        return [1.0 / num_tasks if reduction == "mean" else 1.0] * num_tasks, []
    orders = [  # a stable sort, as NumPy's: the same orders from the same keys
        sorted(others, key=row.__getitem__)
        for others, row in zip(_other_tasks(num_tasks), keys.tolist(), strict=True)
    ]
    rows, projections = _python_surgery(gram, orders)
    if reduction == "mean":
        return [sum(column) / num_tasks for column in zip(*rows, strict=True)], projections
    return [sum(column) for column in zip(*rows, strict=True)], projections


@functools.lru_cache(maxsize=8)
def _other_tasks(num_tasks: int) -> tuple[tuple[int, ...], ...]:
    """For each task ``i``, the other tasks in index order."""
    return tuple(tuple(j for j in range(num_tasks) if j != i) for i in range(num_tasks))


def _projection_matrix(projections: list[tuple[int, int]], num_tasks: int) -> np.ndarray:
    """``[T, T]`` bool, True at every ``(i, j)`` of ``projections``."""
    projected = np.zeros((num_tasks, num_tasks), dtype=bool)
    for i, j in projections:
        projected[i, j] = True
    return projected


def pcgrad(
    grads: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    orders: Tensor | None = None,
) -> Tensor:
    """Combine per-task gradients with PCGrad (Yu et al. 2020).

    Parameters
    ----------
    grads : Tensor
        Per-task gradients, shape ``[T, P]``. Every column is treated as shared.
    generator : torch.Generator, optional
        Source of the random projection orders.
    reduction : {"mean", "sum"}
        How the projected gradients are combined: ``"mean"`` (default) or ``"sum"`` (the paper).
    orders : Tensor, optional
        Explicit ``[T, T - 1]`` projection orders; drawn from ``generator`` when ``None``.

    Returns
    -------
    Tensor
        The combined gradient, shape ``[P]``, same dtype and device as ``grads``.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import pcgrad
    >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> pcgrad(grads, reduction="sum")
    tensor([0.5000, 1.5000])
    """
    check_reduction(reduction)
    _check_matrix(grads, "grads")
    if orders is None:
        orders = projection_orders(grads.shape[0], generator=generator)
    coefficients, _ = pcgrad_coefficients(gramian(grads), orders)
    return _combine(grads, _reduce_coefficients(coefficients.numpy(), reduction))


def _reduce_coefficients(coefficients: np.ndarray, reduction: str) -> np.ndarray:
    """Weights ``c`` (shape ``[T]``) of the combined gradient ``c @ grads``."""
    return coefficients.mean(axis=0) if reduction == "mean" else coefficients.sum(axis=0)


def _combine(grads: Tensor, weights: np.ndarray) -> Tensor:
    """``weights @ grads`` in the dtype and on the device of ``grads``."""
    return torch.from_numpy(weights).to(dtype=grads.dtype, device=grads.device) @ grads


def cosine_similarity_matrix(gramian: Tensor) -> Tensor:
    """Pairwise cosine similarities from a Gramian; zero where a gradient is zero.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import cosine_similarity_matrix
    >>> cosine_similarity_matrix(torch.tensor([[1.0, -2.0], [-2.0, 4.0]]))
    tensor([[ 1., -1.],
            [-1.,  1.]])
    """
    G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    return torch.from_numpy(_cosine_similarity_matrix(G)).to(gramian.dtype)


def _cosine_similarity_matrix(G: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(G.diagonal(), 0, None))
    outer = np.outer(norms, norms)
    return np.divide(G, outer, out=np.zeros_like(G), where=outer > 0)


def conflicting_pairs(gramian: Tensor) -> int:
    """Number of task pairs ``i < j`` whose gradients conflict (``g_i . g_j < 0``).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import conflicting_pairs
    >>> conflicting_pairs(torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.1], [0.5, -0.1, 1.0]]))
    2
    """
    return len(_conflicts(gramian.tolist()))


def _conflicts(gramian: list[list[float]]) -> list[tuple[int, int]]:
    """The pairs ``i < j`` whose gradients conflict: ``g_i . g_j < 0``."""
    return [(i, j) for i, row in enumerate(gramian) for j in range(i + 1, len(row)) if row[j] < 0]


def gradnorm_targets(weighted_norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """GradNorm's target norms ``mean(G) * r_i^alpha`` (Chen et al. 2018, eq. 2).

    ``r_i = loss_ratios[i] / mean(loss_ratios)`` is task ``i``'s relative inverse training rate.

    Parameters
    ----------
    weighted_norms : Tensor
        ``G_i = ||grad_W (w_i L_i)||``, shape ``[T]``.
    loss_ratios : Tensor
        Loss ratios ``L_i(t) / L_i(0)``, shape ``[T]``.
    alpha : float
        Asymmetry; ``0`` makes every target the mean norm.

    Returns
    -------
    Tensor
        Targets, shape ``[T]``; detached, since GradNorm holds them constant.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import gradnorm_targets
    >>> gradnorm_targets(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]), alpha=1.0)
    tensor([1., 3.])
    """
    relative_rates = loss_ratios / loss_ratios.mean()
    return (weighted_norms.mean() * relative_rates**alpha).detach()


def gradnorm_loss(weighted_norms: Tensor, targets: Tensor) -> Tensor:
    """GradNorm's loss ``sum_i |G_i - target_i|`` (Chen et al. 2018, eq. 2).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import gradnorm_loss
    >>> gradnorm_loss(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    tensor(2.)
    """
    return (weighted_norms - targets).abs().sum()


def _check_matrix(tensor: Tensor, name: str) -> None:
    if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[0] < 1:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a [T, P] tensor with T >= 1, got {shape}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a float dtype, got {tensor.dtype}")
