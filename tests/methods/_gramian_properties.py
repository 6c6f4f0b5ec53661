"""Hypothesis strategies and checks shared by the tests of the Gramian methods (MGDA, UPGrad,
DualProj, IMTL-G, CAGrad, Aligned-MTL, Nash-MTL)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor


@st.composite
def jacobians(
    draw, min_tasks: int = 2, max_tasks: int = 10, full_rank: bool = False, spread: float = 3.0
) -> Tensor:
    """A float64 ``[T, P]`` Jacobian with rows of scales ``10^-spread..10^spread``; with
    ``full_rank``, ``P >= T`` and no edit, else sometimes a zero row or a repeated or opposed
    row."""
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    num_params = draw(st.integers(num_tasks if full_rank else 1, num_tasks + 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((num_tasks, num_params))
    J *= 10.0 ** rng.uniform(-spread, spread, size=(num_tasks, 1))
    if not full_rank:
        edit_last_row(J, draw(st.sampled_from(["none", "zero", "repeat", "oppose"])))
    return torch.from_numpy(J)


def edit_last_row(J: np.ndarray, edit: str) -> None:
    """Make the last row of ``J`` zero, twice the first, or its opposite (``"none"``: keep it)."""
    if edit == "zero":
        J[-1] = 0.0
    elif edit == "repeat":
        J[-1] = 2.0 * J[0]
    elif edit == "oppose":
        J[-1] = -J[0]


def permutations(num_tasks: int):
    return st.permutations(list(range(num_tasks))).map(torch.tensor)


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    """Largest entry of ``|ours - theirs|`` relative to the largest entry of ``theirs``."""
    return float((ours - theirs).abs().max() / max(float(theirs.abs().max()), 1e-300))


def direction_error(J: Tensor, ours: Tensor, theirs: Tensor) -> float:
    """``||J^T ours - J^T theirs||`` relative to the largest row norm of ``J``: for comparing
    weights that a rank-deficient Gramian leaves non-unique."""
    scale = float(J.norm(dim=1).max())
    if scale == 0:
        return 0.0
    return float((J.T @ (ours - theirs)).norm() / scale)
