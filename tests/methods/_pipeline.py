"""A shared trunk with one head per task, run through MultiTaskOptimizer: what the per-task
gradients are, and what the optimizer wrote into ``.grad``."""

from __future__ import annotations

import torch
from torch import nn

import gradsurgery as gs
from gradsurgery._weighting import Method


def step_through_optimizer(method: Method, num_tasks: int = 3, seed: int = 0):
    """Returns ``(J, shared_grad, head_grads, expected_head_grads)``: the ``[T, P]`` per-task
    gradients of the trunk, the trunk's ``.grad`` after one ``backward``, the heads' ``.grad``
    and each head's own task gradient."""
    torch.manual_seed(seed)
    trunk = nn.Linear(5, 4)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(num_tasks))
    x = torch.randn(8, 5)

    def losses() -> list[torch.Tensor]:
        hidden = torch.tanh(trunk(x))
        return [(heads[i](hidden) ** 2).mean() * (i + 1) for i in range(num_tasks)]

    shared = list(trunk.parameters())
    reference = losses()
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in reference
        ]
    )
    expected_heads = [
        torch.autograd.grad(reference[i], list(heads[i].parameters()), retain_graph=True)
        for i in range(num_tasks)
    ]
    parameters = shared + list(heads.parameters())
    optimizer = gs.MultiTaskOptimizer(
        torch.optim.SGD(parameters, lr=0.1), method, shared_parameters=trunk
    )
    optimizer.zero_grad()
    optimizer.backward(losses())
    shared_grad = torch.cat([p.grad.reshape(-1) for p in shared])
    head_grads = [tuple(p.grad for p in head.parameters()) for head in heads]
    return J, shared_grad, head_grads, expected_heads
