"""FairGrad (Ban & Ji 2024)."""

from __future__ import annotations

from .._linalg import check_number, check_positive_int
from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._fairgrad import _fairgrad_weights, check_on_no_root

__all__ = ["FairGrad"]


class FairGrad(Method):
    r"""FairGrad: the alpha-fair allocation of the update among the tasks.

    The weights solve :math:`G w = w^{-1/\alpha}`: every task's gain
    :math:`g_i \cdot d` from the update :math:`d = \sum_i w_i g_i` is
    :math:`w_i^{-1/\alpha}` (see :func:`~gradsurgery.functional.fairgrad_weights`).
    Parameters outside the shared set get the plain gradient of every task that reaches them,
    as in the authors' code.

    Parameters
    ----------
    alpha : float
        Fairness, ``>= 0`` (default 1, proportional fairness; the authors' experiments use 2).
        ``0`` is the uniform weighting.
    rescale : bool
        Multiply the weights by ``T`` as the authors' code does (default); ``False`` gives
        torchjd's convention.
    max_norm : float
        Clip the shared parameters' combined gradient to this norm, as the authors' code does
        with ``1.0``; ``0`` (default) does not clip.
    tol, max_iter
        The root finder's relative accuracy and step budget.
    on_no_root : {"least_squares", "raise"}
        Where the equation has no positive root (Pareto-stationary gradients): the authors'
        bounded least-squares weights (default), or a ``ValueError`` (``"raise"``), which
        stops the step before anything changes.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.fairgrad import FairGrad
    >>> stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[4.0, 0.0], [0.0, 1.0]])
    >>> FairGrad(alpha=1.0).decide(stats).weights   # T / ||g_i||
    [1.0, 2.0]
    """

    needs = Needs.GRAMIAN
    unshared = "sum"

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        rescale: bool = True,
        max_norm: float = 0.0,
        tol: float = 1e-8,
        max_iter: int = 100,
        on_no_root: str = "least_squares",
    ) -> None:
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}")
        self.alpha = check_number(alpha, "alpha", low=0.0)
        self.rescale = rescale
        self.max_norm = check_number(max_norm, "max_norm", low=0.0)
        self.tol = check_number(tol, "tol", low=0.0, low_open=True)
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.on_no_root = check_on_no_root(on_no_root)

    def decide(self, stats: TaskStats) -> Decision:
        weights = _fairgrad_weights(
            stats.gramian_rows,
            self.alpha,
            self.rescale,
            self.max_norm,
            self.tol,
            self.max_iter,
            self.on_no_root,
        )
        return Decision(weights=weights)

    def __repr__(self) -> str:
        return (
            f"FairGrad(alpha={self.alpha}, rescale={self.rescale}, max_norm={self.max_norm}, "
            f"tol={self.tol}, max_iter={self.max_iter}, on_no_root={self.on_no_root!r})"
        )
