"""The methods: one module of mathematics each, every one a :class:`~gradsurgery.Method`.

Each is wrapped into a public optimizer class of the same name in :mod:`gradsurgery`
(``gs.PCGrad(optimizer, ...)``), or passed to :class:`~gradsurgery.MultiTaskOptimizer`.
"""

from .gradnorm import GradNorm
from .linear_scalarization import LinearScalarization
from .mean import Mean
from .pcgrad import PCGrad

__all__ = ["GradNorm", "LinearScalarization", "Mean", "PCGrad"]
