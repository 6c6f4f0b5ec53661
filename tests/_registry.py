"""Every method the contract suite (tests/test_contract.py) holds to its promises.

One line per method: ``(id, factory)``, where ``factory(num_tasks)`` builds the method with
the hyper-parameters to test. A method with learned parameters exposes them as
``method.parameters()``; the wrapper adds them to the optimizer.
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
    ("mgda", lambda T: M.MGDA()),
    ("mgda-loss+", lambda T: M.MGDA(normalization="loss+")),
    ("upgrad", lambda T: M.UPGrad()),
    ("dualproj", lambda T: M.DualProj()),
    ("imtlg", lambda T: M.IMTLG()),
    ("cagrad", lambda T: M.CAGrad(0.4)),
    ("aligned-mtl", lambda T: M.AlignedMTL()),
    ("nash-mtl", lambda T: M.NashMTL(update_weights_every=2)),
    ("fairgrad", lambda T: M.FairGrad()),
    ("config", lambda T: M.ConFIG()),
    ("gradvac", lambda T: M.GradVac(generator=_generator())),
    ("graddrop", lambda T: M.GradDrop(generator=_generator())),
    ("uw", lambda T: M.UW(T, dtype=torch.float64)),
    ("imtl-l", lambda T: M.IMTLL(T, dtype=torch.float64)),
    # float32 log-variances beside the float64 model: the method's own parameters never go
    # through the engine (whose per-task gradient matrix holds one dtype).
    ("uw-float32", lambda T: M.UW(T)),
    ("dwa", lambda T: M.DWA(window="step")),
    ("rlw", lambda T: M.RLW(generator=_generator())),
    ("gls", lambda T: M.GLS()),
    ("famo", lambda T: M.FAMO(T)),
    ("dbmtl", lambda T: M.DBMTL()),
    ("stch", lambda T: M.STCH(warmup_epochs=0)),
    ("stch-plain", lambda T: M.STCH(log_transform=False)),
]
