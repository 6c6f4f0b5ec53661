"""BASELINES, not gradsurgery: the implementations gradsurgery is compared against.

- :class:`StraightforwardPCGrad`: PCGrad the way most users copy it from the popular
  PyTorch ports of Yu et al. (2020): one ``backward(retain_graph=True)`` per task, a flattened
  copy of every task gradient, a Python loop of pairwise projections in a shuffled order, and
  the mean written back into ``.grad``.
- :class:`ReferenceGradNorm`: GradNorm the way the reference study did it
  (``/work/shared/reference/study-design-notes.md``): a first forward pass, per-task gradients
  at the shared layer with ``create_graph=True``, the GradNorm loss backpropagated through them
  (a double backward) to the log-weights, then a second forward pass and a weighted backward.
- torchjd (https://github.com/SimplexLab/TorchJD): :class:`TorchjdAutojac`, any of its
  aggregators (:data:`TORCHJD_AGGREGATORS`, the methods gradsurgery also has) through
  ``torchjd.autojac.backward`` + ``jac_to_grad`` (the Jacobian, computed with vmap); and
  :class:`TorchjdAutogramPCGrad`, its PCGrad weighting on the Gramian of the
  ``torchjd.autogram.Engine`` (computed with module hooks).

They are written plainly, as a user would, and are not tuned.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class StraightforwardPCGrad:
    """PCGrad with one retained backward per task and pairwise projections in Python."""

    def __init__(self, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.rng = random.Random(seed)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def pc_backward(self, losses: Sequence[Tensor]) -> None:
        grads = [self._task_gradient(loss) for loss in losses]
        projected = copy.deepcopy(grads)
        for g_i in projected:
            self.rng.shuffle(grads)
            for g_j in grads:
                dot = g_i @ g_j
                if dot < 0:
                    g_i -= dot * g_j / g_j.norm() ** 2
        merged = torch.stack(projected).mean(dim=0)
        self._write_grads(merged)

    def _task_gradient(self, loss: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return torch.cat(
            [
                p.new_zeros(p.numel()) if p.grad is None else p.grad.flatten().clone()
                for p in self.params
            ]
        )

    def _write_grads(self, flat: Tensor) -> None:
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


class ReferenceGradNorm:
    """GradNorm as in the reference study: double backward, then a second forward pass.

    ``weights = T * softmax(log_weights)``; ``G_i = ||grad_W (w_i L_i)||`` at the shared layer
    ``W`` with ``create_graph=True``; ``gradnorm_loss = sum_i |G_i - target_i|`` is backpropagated
    (through the gradients, into the log-weights and the network), the log-weights take an Adam
    step, and the network's ``.grad`` is cleared before the second pass.
    """

    def __init__(
        self, num_tasks: int, shared_layer: nn.Module, alpha: float = 1.5, lr: float = 0.01
    ) -> None:
        self.num_tasks = num_tasks
        self.shared = list(shared_layer.parameters())
        self.alpha = alpha
        self.log_weights = nn.Parameter(self.shared[0].new_zeros(num_tasks))
        self.weight_optimizer = torch.optim.Adam([self.log_weights], lr=lr)
        self.initial_losses: Tensor | None = None

    def weights(self) -> Tensor:
        return self.num_tasks * torch.softmax(self.log_weights, dim=0)

    def update_weights(self, losses: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
        weights = self.weights()
        norms = []
        for w, loss in zip(weights, losses, strict=True):
            grads = torch.autograd.grad(w * loss, self.shared, retain_graph=True, create_graph=True)
            norms.append(torch.cat([g.flatten() for g in grads]).norm())
        norms = torch.stack(norms)
        loss_values = torch.stack([loss.detach() for loss in losses])
        if self.initial_losses is None:
            self.initial_losses = loss_values
        ratios = loss_values / self.initial_losses
        targets = (norms.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        gradnorm_loss = (norms - targets).abs().sum()
        self.weight_optimizer.zero_grad()
        gradnorm_loss.backward()  # frees the graph: hence the second forward pass
        self.weight_optimizer.step()
        optimizer.zero_grad()  # the double backward also wrote into the network's .grad

    def weighted_loss(self, losses: Sequence[Tensor]) -> Tensor:
        weights = self.weights().detach()
        return sum(w * loss for w, loss in zip(weights, losses, strict=True))


def torchjd_version() -> str | None:
    """The installed torchjd version, or None when it cannot be imported."""
    try:
        from importlib.metadata import version

        import torchjd  # noqa: F401
    except ImportError:
        return None
    return version("torchjd")


def _torchjd_aggregators() -> dict[str, Callable[[int], object]]:
    """gradsurgery's method name -> a builder of torchjd's aggregator for ``num_tasks`` tasks.

    The hyper-parameters are gradsurgery's defaults (CAGrad: the benchmarks' ``c = 0.5``), so
    both libraries compute the same method.
    """
    if torchjd_version() is None:
        return {}
    from torchjd import aggregation as a

    return {
        "PCGrad": lambda t: a.PCGrad(),
        "MGDA": lambda t: a.MGDA(),
        "CAGrad": lambda t: a.CAGrad(c=0.5),
        "NashMTL": lambda t: a.NashMTL(n_tasks=t),
        "IMTLG": lambda t: a.IMTLG(),
        "AlignedMTL": lambda t: a.AlignedMTL(),
        "UPGrad": lambda t: a.UPGrad(),
        "DualProj": lambda t: a.DualProj(),
        "FairGrad": lambda t: a.FairGrad(alpha=1.0),
        "ConFIG": lambda t: a.ConFIG(),
        "GradVac": lambda t: a.GradVac(beta=0.5),
        "GradDrop": lambda t: a.GradDrop(),
        "RLW": lambda t: a.Random(),
    }


class TorchjdAutojac:
    """torchjd's ``autojac.backward`` then ``jac_to_grad`` with any aggregator."""

    def __init__(self, model: nn.Module, aggregator: object) -> None:
        self.params = list(model.parameters())
        self.aggregator = aggregator

    def backward(self, losses: Sequence[Tensor]) -> None:
        from torchjd.autojac import backward, jac_to_grad

        backward(list(losses), inputs=self.params)
        jac_to_grad(self.params, self.aggregator)


class TorchjdAutogramPCGrad:
    """torchjd's PCGrad weighting on the Gramian from ``torchjd.autogram.Engine``.

    The losses here are per task, not per sample, so the engine is built with
    ``batch_dim=None``; the Gramian is turned into weights by ``PCGradWeighting`` and the
    weighted losses are backpropagated once, as in torchjd's documentation.
    """

    def __init__(self, model: nn.Module) -> None:
        from torchjd.aggregation import PCGradWeighting
        from torchjd.autogram import Engine

        self.engine = Engine(model, batch_dim=None)
        self.weighting = PCGradWeighting()

    def backward(self, losses: Sequence[Tensor]) -> None:
        stacked = torch.stack(list(losses))
        gramian = self.engine.compute_gramian(stacked)
        stacked.backward(self.weighting(gramian))


TORCHJD_AGGREGATORS = _torchjd_aggregators()
