"""ConFIG (Liu et al. 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .._linalg import check_number
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._config import _config_weights, check_pref_vector

__all__ = ["ConFIG"]


class ConFIG(Method):
    r"""ConFIG: the direction on which every unit task gradient has the same projection.

    The direction solves :math:`U x = w` for the unit gradients :math:`U` in the least-squares
    sense (equal projections for the default :math:`w = \mathbf 1`), and its length is the sum
    of the gradients' projections on it (see :func:`~gradsurgery.functional.config_weights`).
    Parameters outside the shared set get the plain gradient of every task that reaches them.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` nonnegative target projections (the authors' weight model); ones by default.
    rcond : float
        Relative eigenvalue cutoff of the cosine matrix's pseudo-inverse.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.config import ConFIG
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, 0.0], [0.0, 1.0]])
    >>> ConFIG().decide(stats).weights   # orthogonal unit gradients: their sum
    [1.0, 1.0]
    """

    needs = Needs.GRAMIAN
    unshared = "sum"

    def __init__(
        self, pref_vector: Sequence[float] | Tensor | None = None, *, rcond: float = 1e-10
    ) -> None:
        self.pref_vector = None if pref_vector is None else check_pref_vector(pref_vector, None)
        self.rcond = check_number(rcond, "rcond", low=0.0, high=1.0)

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        if self.pref_vector is not None and self.pref_vector.size != num_tasks:
            raise ValueError(
                f"ConFIG's pref_vector has {self.pref_vector.size} entries, got {num_tasks} tasks"
            )

    def decide(self, stats: TaskStats) -> Decision:
        self.check_num_tasks(stats.num_tasks)
        G = np.array(stats.gramian_rows, dtype=np.float64)
        return Decision(weights=_config_weights(G, self.pref_vector, self.rcond).tolist())

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"ConFIG(pref_vector={pref}, rcond={self.rcond})"
