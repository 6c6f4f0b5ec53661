"""UPGrad (Quinton and Rey 2024): every task gradient projected onto the dual cone."""

from __future__ import annotations

from ..functional._upgrad import solve_upgrad
from ._dual_cone import DualConeMethod

__all__ = ["UPGrad"]


class UPGrad(DualConeMethod):
    """The sum of the task gradients' projections onto the dual cone of all of them.

    See :func:`gradsurgery.functional.upgrad_weights`.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` preferences; the mean (``1 / T``) when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of the Gramian; ``0, 0`` (default) is the exact projection.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.upgrad import UPGrad
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -1.0], [-1.0, 4.0]])
    >>> UPGrad().decide(stats).weights
    [1.0, 0.625]
    """

    solver = staticmethod(solve_upgrad)
