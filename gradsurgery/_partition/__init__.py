"""The batch-partition engine: per-task gradients from one backward pass.

``engine`` puts the pieces together, ``recording`` holds the forward hooks and the checks that
send a layer to the slow path, ``plan`` decides where each parameter's gradients come from
(cached per call pattern), and ``layers`` is the registry of per-layer gradient formulas.
"""

from .engine import BatchPartitionEngine

__all__ = ["BatchPartitionEngine"]
