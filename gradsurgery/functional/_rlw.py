"""Random loss weighting (Lin et al. 2022): weights drawn afresh at every step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._losses import float64

__all__ = ["RLW_DISTRIBUTIONS", "rlw_weights"]

RLW_DISTRIBUTIONS = ("normal", "dirichlet")


def rlw_weights(
    num_tasks: int, distribution: str = "normal", *, generator: torch.Generator | None = None
) -> Tensor:
    """Draw random task weights on the simplex.

    ``"normal"``: ``softmax(z)`` with ``z ~ N(0, I)`` (the paper's Algorithm 2, and the
    authors' LibMTL code). ``"dirichlet"``: ``Dirichlet(1, ..., 1)``, uniform on the simplex,
    drawn as normalized ``Exp(1)`` variates.

    Parameters
    ----------
    num_tasks : int
        ``T >= 1``.
    distribution : {"normal", "dirichlet"}
        The distribution of the weights.
    generator : torch.Generator, optional
        Source of randomness; the global generator when ``None``. ``"normal"`` draws ``T``
        float32 normals (``torch.randn``), exactly as LibMTL does, so a seeded generator gives
        LibMTL's weights.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights, positive, summing to one.

    Examples
    --------
    >>> import torch
    >>> from gradsurgery.functional import rlw_weights
    >>> weights = rlw_weights(3, generator=torch.Generator().manual_seed(0))
    >>> weights.shape, round(float(weights.sum()), 12)
    (torch.Size([3]), 1.0)
    """
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    check_distribution(distribution)
    return float64(_rlw_weights(num_tasks, distribution, generator))


def check_distribution(distribution: str) -> None:
    if distribution not in RLW_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {RLW_DISTRIBUTIONS}, got {distribution!r}")


def _rlw_weights(
    num_tasks: int, distribution: str, generator: torch.Generator | None
) -> list[float]:
    device = generator.device if generator is not None else None
    if distribution == "normal":
        draws = torch.randn(num_tasks, generator=generator, device=device).tolist()
        top = max(draws)
        exps = [math.exp(z - top) for z in draws]
    else:
        uniforms = torch.rand(num_tasks, generator=generator, dtype=torch.float64, device=device)
        exps = [-math.log1p(-u) for u in uniforms.tolist()]  # Exp(1); u < 1, so finite
        if max(exps) == 0.0:  # every draw exactly 0: probability 2^-53T, but never 0/0
            exps = [1.0] * num_tasks
    total = math.fsum(exps)
    return [e / total for e in exps]
