"""gradsurgery: multi-task gradient methods for PyTorch.

Wrap the optimizer you already have, pass one loss per task, and the task gradients are
combined by the method you chose: PCGrad (Yu et al. 2020), GradNorm (Chen et al. 2018), the
plain mean, or a method of your own (:class:`Method`).
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

__version__ = "0.1.0"

__all__ = [
    "BatchPartitionEngine",
    "ConflictStats",
    "Decision",
    "GradNorm",
    "GradNormInfo",
    "LinearScalarization",
    "Mean",
    "Method",
    "MultiTaskOptimizer",
    "Needs",
    "NonFiniteError",
    "PCGrad",
    "PCGradInfo",
    "StepInfo",
    "TaskStats",
    "__version__",
    "functional",
    "methods",
    "task_gradients",
]
