"""DualProj (Lopez-Paz and Ranzato 2017, GEM): the mean projected onto the dual cone."""

from __future__ import annotations

from ..functional._dualproj import solve_dualproj
from ._dual_cone import DualConeMethod

__all__ = ["DualProj"]


class DualProj(DualConeMethod):
    """The closest direction to the (preference-weighted) mean that conflicts with no task.

    See :func:`gradsurgery.functional.dualproj_weights`.

    Parameters
    ----------
    pref_vector : sequence of float or Tensor, optional
        ``[T]`` weights of the combination to project; the mean when ``None``.
    norm_eps, reg_eps : float
        torchjd's conditioning of the Gramian; ``0, 0`` (default) is the exact projection.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.dualproj import DualProj
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -2.0], [-2.0, 8.0]])
    >>> DualProj().decide(stats).weights
    [1.0, 0.5]
    """

    solver = staticmethod(solve_dualproj)
