"""The methods: one module of mathematics each, every one a :class:`~gradsurgery.Method`.

Each is wrapped into a public optimizer class of the same name in :mod:`gradsurgery`
(``gs.PCGrad(optimizer, ...)``), or passed to :class:`~gradsurgery.MultiTaskOptimizer`.
"""

from .aligned_mtl import AlignedMTL
from .cagrad import CAGrad
from .config import ConFIG
from .dbmtl import DBMTL
from .dualproj import DualProj
from .dwa import DWA
from .fairgrad import FairGrad
from .famo import FAMO
from .gls import GLS
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl_l import IMTLL
from .imtlg import IMTLG
from .linear_scalarization import LinearScalarization
from .mean import Mean
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .rlw import RLW
from .stch import STCH
from .upgrad import UPGrad
from .uw import UW

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "STCH",
    "UW",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "LinearScalarization",
    "Mean",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
