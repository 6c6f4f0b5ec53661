"""ConFIG (Liu et al. 2025): the conflict-free direction, as weights of the task gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._linalg import as_gramian, check_number

__all__ = ["config_weights"]


def config_weights(
    gramian: Tensor, pref_vector: Sequence[float] | Tensor | None = None, *, rcond: float = 1e-10
) -> Tensor:
    r"""ConFIG's update as weights of the task gradients (Liu et al. 2025, eq. 2).

    With :math:`u_i = g_i / \lVert g_i \rVert` the unit gradients (rows of :math:`U`) and
    :math:`w` the preference vector (ones by default), ConFIG's direction is the minimum-norm
    least-squares solution of :math:`U x = w`, :math:`x = U^{+} w`: every unit gradient has
    the projection :math:`w_i` on it (equal projections by default), so no task conflicts with
    it. Its length is the sum of the gradients' projections on it (the authors'
    ``ProjectionLength``):

    .. math::

        d = \Big(\sum_i g_i \cdot \hat x\Big)\, \hat x, \qquad \hat x = x / \lVert x \rVert .

    Everything comes from the Gramian: with :math:`D = \mathrm{diag}(\lVert g_i \rVert)` and
    the cosine matrix :math:`C = D^{-1} G D^{-1} = U U^\top`, :math:`x = U^\top y` with
    :math:`y = C^{+} w`, so :math:`d = \beta^\top J` with

    .. math::

        \beta = \frac{\mathbf 1^\top G D^{-1} y}{y^\top C y}\, D^{-1} y .

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian of the task gradients.
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` nonnegative target projections, not all zero; ones by default.
    rcond : float
        The pseudo-inverse of :math:`C` drops its eigenvalues below ``rcond`` times the largest
        (singular values of :math:`U` below ``sqrt(rcond)`` times the largest): exactly
        dependent unit gradients (duplicate tasks, a rank-deficient Jacobian) are resolved in
        the least-squares sense, as the authors' ``lstsq`` and torchjd's ``pinv`` do.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights ``beta``. A zero gradient gets weight 0 (its unit vector is
        zero, as in the authors' code); all weights are 0 when every gradient is zero.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import config_weights
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> d = config_weights(J @ J.T) @ J
    >>> J @ d / J.norm(dim=1)                # equal projections of the unit gradients
    tensor([0.3536, 0.3536], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    pref = None if pref_vector is None else check_pref_vector(pref_vector, G.shape[0])
    rcond = check_number(rcond, "rcond", low=0.0, high=1.0)
    return torch.from_numpy(_config_weights(G, pref, rcond))


def check_pref_vector(pref_vector: Sequence[float] | Tensor, num_tasks: int | None) -> np.ndarray:
    """The preference vector as float64: finite, nonnegative, not all zero, ``T`` long."""
    if isinstance(pref_vector, Tensor):
        pref_vector = pref_vector.detach().cpu().tolist()
    try:
        pref = np.array(pref_vector, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"pref_vector must be a sequence of numbers: {error}") from error
    if pref.ndim != 1 or pref.size == 0:
        raise ValueError(f"pref_vector must be one-dimensional and non-empty, got {pref.shape}")
    if not np.isfinite(pref).all() or (pref < 0).any() or not (pref > 0).any():
        raise ValueError(f"pref_vector must be finite, nonnegative and not all zero, got {pref}")
    if num_tasks is not None and pref.size != num_tasks:
        raise ValueError(f"pref_vector has {pref.size} entries for {num_tasks} tasks")
    return pref


def _config_weights(G: np.ndarray, pref: np.ndarray | None, rcond: float) -> np.ndarray:
    num_tasks = G.shape[0]
    norms = np.sqrt(G.diagonal())
    active = norms > 0
    inverse_norms = np.divide(1.0, norms, out=np.zeros(num_tasks), where=active)
    cosines = G * np.outer(inverse_norms, inverse_norms)  # U U^T, zero rows for zero gradients
    target = np.ones(num_tasks) if pref is None else pref
    eigenvalues, eigenvectors = np.linalg.eigh(cosines)
    keep = eigenvalues > rcond * max(float(eigenvalues[-1]), 0.0)
    if not keep.any():  # every gradient is zero
        return np.zeros(num_tasks)
    basis = eigenvectors[:, keep]
    y = basis @ ((basis.T @ target) / eigenvalues[keep])  # C^+ w
    squared_norm = float(y @ cosines @ y)  # ||U^T y||^2 = ||x||^2
    if not squared_norm > 0 or not math.isfinite(squared_norm):
        return np.zeros(num_tasks)
    coefficients = inverse_norms * y  # x = J^T (D^-1 y)
    length = float((G @ coefficients).sum())  # sum_i g_i . x = ||x|| sum_i g_i . x_hat
    return coefficients * (length / squared_norm)
