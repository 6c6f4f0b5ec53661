"""gradsurgery: multi-task gradient methods for PyTorch.

Wrap the optimizer you already have, pass one loss per task, and the task gradients are
combined by the method you chose: one of twenty-odd published methods (PCGrad, MGDA,
UPGrad, CAGrad, Nash-MTL, GradNorm, uncertainty weighting, FAMO, ...), the plain mean, or a
method of your own (:class:`Method`).
"""

from . import functional, methods
from ._autograd import task_gradients
from ._info import ConflictStats, GradNormInfo, PCGradInfo, StepInfo
from ._partition import BatchPartitionEngine
from ._validation import NonFiniteError
from ._weighting import Decision, Method, Needs, TaskStats
from ._wrappers import GradNorm, MultiTaskOptimizer, wrapper_class

# One public optimizer class per method: its hyper-parameters as keyword arguments.
PCGrad = wrapper_class(methods.PCGrad, aliases={"pc_backward": "backward"})
Mean = wrapper_class(methods.Mean)
LinearScalarization = wrapper_class(methods.LinearScalarization)
MGDA = wrapper_class(methods.MGDA)
UPGrad = wrapper_class(methods.UPGrad)
DualProj = wrapper_class(methods.DualProj)
IMTLG = wrapper_class(methods.IMTLG)
CAGrad = wrapper_class(methods.CAGrad)
AlignedMTL = wrapper_class(methods.AlignedMTL)
NashMTL = wrapper_class(methods.NashMTL)
FairGrad = wrapper_class(methods.FairGrad)
ConFIG = wrapper_class(methods.ConFIG)
GradVac = wrapper_class(methods.GradVac)
GradDrop = wrapper_class(methods.GradDrop)
UW = wrapper_class(methods.UW)
IMTLL = wrapper_class(methods.IMTLL)
DWA = wrapper_class(methods.DWA)
RLW = wrapper_class(methods.RLW)
GLS = wrapper_class(methods.GLS)
FAMO = wrapper_class(methods.FAMO)
DBMTL = wrapper_class(methods.DBMTL)
STCH = wrapper_class(methods.STCH)

__version__ = "0.1.0"

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
    "BatchPartitionEngine",
    "CAGrad",
    "ConFIG",
    "ConflictStats",
    "Decision",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradNormInfo",
    "GradVac",
    "LinearScalarization",
    "Mean",
    "Method",
    "MultiTaskOptimizer",
    "NashMTL",
    "Needs",
    "NonFiniteError",
    "PCGrad",
    "PCGradInfo",
    "StepInfo",
    "TaskStats",
    "UPGrad",
    "__version__",
    "functional",
    "methods",
    "task_gradients",
]
