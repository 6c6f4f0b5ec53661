"""GradVac (Wang et al. 2021): gradient vaccine, computed on the Gramian."""

# No ``from __future__ import annotations``: Sphinx resolves the evaluated ``tuple[Tensor,
# Tensor]`` return type, not its string form.

import functools
import math

import numpy as np
import torch
from torch import Tensor

from .._linalg import as_gramian, check_number

__all__ = ["gradvac_weights"]

# Squared norm, relative to the squared norms combined into g_i', below which g_i' has
# cancelled: float64 rounding of those terms is about 1e-16 of them.
_CANCELLED = 1e-14


def gradvac_weights(
    gramian: Tensor,
    targets: Tensor | None = None,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    orders: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""GradVac's combination weights and its updated cosine targets (Wang et al. 2021, Alg. 1).

    Every task :math:`i` starts from :math:`g_i' = g_i` and visits the other tasks in a random
    order, as PCGrad does. For each :math:`j`, with :math:`\phi_{ij}` the cosine of
    :math:`g_i'` and :math:`g_j` and :math:`\hat\phi_{ij}` the pair's target, when
    :math:`\phi_{ij} < \hat\phi_{ij}` it adds the multiple of :math:`g_j` that raises the
    cosine to the target,

    .. math::

        g_i' \leftarrow g_i' + \frac{\lVert g_i' \rVert \big(\hat\phi_{ij}
        \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}
        {\lVert g_j \rVert \sqrt{1 - \hat\phi_{ij}^2} + \epsilon}\; g_j ,

    then moves the target towards the cosine seen, :math:`\hat\phi_{ij} \leftarrow
    (1 - \beta) \hat\phi_{ij} + \beta \phi_{ij}`. The update is :math:`\sum_i g_i'`. Each
    :math:`g_i'` is a combination of the original gradients, so all of it runs on the Gramian
    and the update is :math:`w^\top J`.

    Parameters
    ----------
    gramian : Tensor
        ``[T, T]`` Gramian of the task gradients.
    targets : Tensor, optional
        ``[T, T]`` cosine targets :math:`\hat\phi` (row ``i``, column ``j``: the pair ``(i, j)``);
        zeros (the paper's start) when ``None``.
    beta : float
        EMA rate of the targets, in ``[0, 1]`` (default 0.5, as LibMTL and torchjd).
    eps : float
        Added to the two denominators, as LibMTL and torchjd do (default ``1e-8``); ``0`` gives
        the paper's formula, which is invariant to the gradients' scale. A cosine with a zero
        gradient counts as 0, and so does one with a :math:`g_i'` that cancelled to rounding
        level (squared norm below ``1e-14`` times the largest squared norm combined into it,
        as after a correction by an exactly opposite :math:`g_j`). With ``eps = 0`` a
        correction whose denominator is zero (a zero :math:`g_j`, or a target of exactly
        :math:`\pm 1`) is skipped.
    orders : Tensor, optional
        ``[T, T - 1]`` visiting orders (row ``i``: the other tasks, in the order task ``i``
        visits them); drawn as :func:`~gradsurgery.functional.projection_orders` when ``None``.
    generator : torch.Generator, optional
        Source of the orders when ``orders`` is ``None``.

    Returns
    -------
    weights : Tensor
        ``[T]`` float64: the update is ``weights @ J``.
    targets : Tensor
        ``[T, T]`` float64 updated targets (the diagonal stays as given).

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import gradvac_weights
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> weights, targets = gradvac_weights(J @ J.T, eps=0.0, orders=torch.tensor([[1], [0]]))
    >>> weights                      # g_1' = g_1 + 0.5 g_2, g_2' = g_2 + g_1
    tensor([2.0000, 1.5000], dtype=torch.float64)
    >>> float((J[0] + 0.5 * J[1]) @ J[1])   # the cosine of g_1' and g_2: the target, 0
    0.0
    >>> targets                      # half-way to the cosine seen, -1/sqrt(2)
    tensor([[ 0.0000, -0.3536],
            [-0.3536,  0.0000]], dtype=torch.float64)
    """
    G = as_gramian(gramian)
    num_tasks = G.shape[0]
    beta = check_number(beta, "beta", low=0.0, high=1.0)
    eps = check_number(eps, "eps", low=0.0)
    if targets is None:
        target_rows = [[0.0] * num_tasks for _ in range(num_tasks)]
    else:
        target_rows = check_targets(targets, num_tasks)
    if orders is None:
        from . import _projection_orders  # the package imports this module

        order_rows = _projection_orders(num_tasks, generator).tolist()
    else:
        order_rows = _check_orders(orders, num_tasks)
    weights, new_targets = _gradvac(G.tolist(), target_rows, order_rows, beta, eps)
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    return as_tensor(weights), as_tensor(new_targets)


def check_targets(targets: object, num_tasks: int) -> list[list[float]]:
    """The targets as ``T`` lists of ``T`` floats: a finite ``[T, T]`` array."""
    if isinstance(targets, Tensor):
        targets = targets.detach().cpu().double().numpy()
    try:
        array = np.asarray(targets, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"GradVac's targets must be a [T, T] array of cosines: {error}") from error
    if array.shape != (num_tasks, num_tasks) or not np.isfinite(array).all():
        raise ValueError(
            f"GradVac's targets must be a finite [{num_tasks}, {num_tasks}] array of cosines, "
            f"got shape {array.shape}"
        )
    return array.tolist()


def _check_orders(orders: Tensor, num_tasks: int) -> list[list[int]]:
    rows = orders.tolist() if isinstance(orders, Tensor) else list(map(list, orders))
    expected = [sorted(set(range(num_tasks)) - {i}) for i in range(num_tasks)]
    if len(rows) != num_tasks or any(sorted(r) != e for r, e in zip(rows, expected, strict=True)):
        raise ValueError(
            f"orders must have shape [{num_tasks}, {num_tasks - 1}], row i a permutation of the "
            "tasks other than i"
        )
    return rows


def _gradvac(
    gram: list[list[float]],
    targets: list[list[float]],
    orders: list[list[int]],
    beta: float,
    eps: float,
) -> tuple[list[float], list[list[float]]]:
    """The surgery on Python floats: ``O(T^2)`` pairs, ``O(T)`` work per correction."""
    num_tasks = len(gram)
    norms = [math.sqrt(max(gram[k][k], 0.0)) for k in range(num_tasks)]
    new_targets = [row[:] for row in targets]
    weights = [0.0] * num_tasks
    for i, order in enumerate(orders):
        row = [0.0] * num_tasks  # g_i' = sum_k row[k] g_k
        row[i] = 1.0
        dots = gram[i][:]  # g_i' . g_k for every k
        squared_norm = gram[i][i]  # ||g_i'||^2
        magnitude = squared_norm  # the largest squared norm combined into g_i'
        for j in order:
            # A g_i' that cancelled to rounding level (an exactly opposite g_j) is zero: its
            # cosines would be rounding noise over eps.
            cancelled = squared_norm <= _CANCELLED * magnitude
            norm_i = 0.0 if cancelled else math.sqrt(squared_norm)
            denominator = norm_i * norms[j] + eps
            cosine = dots[j] / denominator if denominator > 0 and not cancelled else 0.0
            target = targets[i][j]
            if cosine < target:
                target_sine = math.sqrt(max(1.0 - target * target, 0.0))
                denominator = norms[j] * target_sine + eps
                if denominator > 0:
                    sine = math.sqrt(max(1.0 - cosine * cosine, 0.0))
                    w = norm_i * (target * sine - cosine * target_sine) / denominator
                    row[j] += w
                    squared_norm += w * (2.0 * dots[j] + w * gram[j][j])
                    magnitude = max(magnitude, w * w * gram[j][j])
                    gram_j = gram[j]
                    for k in range(num_tasks):
                        dots[k] += w * gram_j[k]
            new_targets[i][j] = (1.0 - beta) * target + beta * cosine
        for k in range(num_tasks):
            weights[k] += row[k]
    return weights, new_targets
