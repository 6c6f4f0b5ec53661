"""gradsurgery: multi-task gradient methods for PyTorch.

Wrap the optimizer you already have, pass one loss per task, and the task gradients are
combined by PCGrad (Yu et al. 2020) or weighted by GradNorm (Chen et al. 2018).
"""

from . import functional
from ._engine import task_gradients
from ._gradnorm import GradNorm, GradNormInfo
from ._partition import BatchPartitionEngine
from ._pcgrad import ConflictStats, PCGrad, PCGradInfo
from ._validation import NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "BatchPartitionEngine",
    "ConflictStats",
    "GradNorm",
    "GradNormInfo",
    "NonFiniteError",
    "PCGrad",
    "PCGradInfo",
    "__version__",
    "functional",
    "task_gradients",
]
