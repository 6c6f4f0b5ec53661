"""Every method the contract suite (tests/test_contract.py) holds to its promises.

One line per method: ``(id, factory)``, where ``factory(num_tasks)`` builds the method with
the hyper-parameters to test. A method with learned parameters exposes them as
``method.parameters()``; the suite adds them to the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradsurgery import Method
from gradsurgery import methods as M


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


METHODS: list[tuple[str, Callable[[int], Method]]] = [
    ("mean", lambda T: M.Mean()),
    ("linear-scalarization", lambda T: M.LinearScalarization([0.5 + t for t in range(T)])),
    ("pcgrad", lambda T: M.PCGrad(generator=_generator())),
    ("pcgrad-sum", lambda T: M.PCGrad(reduction="sum", generator=_generator())),
    ("gradnorm", lambda T: M.GradNorm(alpha=1.5, lr=0.05)),
]
