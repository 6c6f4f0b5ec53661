"""The two-objective toy problem of CAGrad (Liu et al. 2021, Figure 1), batched over points.

Transcribed from class ``Toy`` of ``toy.py`` in the CAGrad authors' repository
(github.com/Cranial-XIX/CAGrad, commit dc3d48152b6196945cfd56144879b9d42353b095), method
``batch_forward``: the same operations in the same order, on a ``[N, 2]`` batch of points
instead of one. ``scale`` multiplies the first loss after the gating, as Nash-MTL's copy of
the problem does (github.com/AvivNavon/nash-mtl, ``experiments/toy/problem.py``, commit
cce18403ef5557a6b30f4ba43b896117107d6902, ``f1 *= self.scale``); ``scale=1`` is CAGrad's.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOWER = 0.000005  # the authors' clamp of the log terms' arguments

# The Pareto set as the papers draw it: x2 = -8.3552, x1 in [-7, 7]; (0, -8.3552) minimizes
# the average of the two (unscaled) losses.
PARETO_X2 = -8.3552
PARETO_X1 = (-7.0, 7.0)


def toy_losses(x: Tensor, scale: float = 1.0) -> Tensor:
    """The two losses at each point of ``x`` (shape ``[N, 2]``), as a ``[N, 2]`` tensor."""
    x1 = x[:, 0]
    x2 = x[:, 1]

    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)

    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)

    f1 = f1 * c1 + f1_sq * c2
    f2 = f2 * c1 + f2_sq * c2
    return torch.stack([f1 * scale, f2], dim=1)


def toy_losses_and_jacobians(x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Losses ``[N, 2]`` and Jacobians ``[N, 2 tasks, 2 coordinates]`` at each point of ``x``.

    The derivatives are written out by hand, with autograd's conventions at the kinks
    (``clamp`` passes the gradient where its input equals the bound, ``abs`` has derivative
    ``sign``, 0 at 0), so that they equal :func:`autograd_jacobians` (tested) at a twentieth of
    its cost: the toy benchmark takes millions of these steps.
    """
    x1, x2 = x[:, 0], x[:, 1]
    t = torch.tanh(-x2)
    dt = -(1 - t * t)  # d tanh(-x2) / dx2

    a = 0.5 * (-x1 - 7) - t
    b = 0.5 * (-x1 + 3) + t + 2
    log_a = torch.clamp(a.abs(), LOWER)
    log_b = torch.clamp(b.abs(), LOWER)
    # d log(clamp(|u|, LOWER)) / du
    da = torch.where(a.abs() >= LOWER, torch.sign(a) / log_a, torch.zeros_like(a))
    db = torch.where(b.abs() >= LOWER, torch.sign(b) / log_b, torch.zeros_like(b))
    f1, f2 = log_a.log() + 6, log_b.log() + 6
    df1 = (da * -0.5, da * -dt)
    df2 = (db * -0.5, db * dt)

    h = torch.tanh(x2 * 0.5)
    c1 = torch.clamp(h, 0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    dh = 0.5 * (1 - h * h)
    dc1 = torch.where(h >= 0, dh, torch.zeros_like(h))
    dc2 = torch.where(-h >= 0, -dh, torch.zeros_like(h))

    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    dsq_x2 = 0.02 * (x2 + 8)
    df1_sq = (0.2 * (x1 - 7), dsq_x2)
    df2_sq = (0.2 * (x1 + 7), dsq_x2)

    loss1 = f1 * c1 + f1_sq * c2
    loss2 = f2 * c1 + f2_sq * c2
    grad1 = torch.stack([df1[0] * c1 + df1_sq[0] * c2,
                         df1[1] * c1 + f1 * dc1 + df1_sq[1] * c2 + f1_sq * dc2], dim=1)  # fmt: skip
    grad2 = torch.stack([df2[0] * c1 + df2_sq[0] * c2,
                         df2[1] * c1 + f2 * dc1 + df2_sq[1] * c2 + f2_sq * dc2], dim=1)  # fmt: skip
    losses = torch.stack([loss1 * scale, loss2], dim=1)
    return losses, torch.stack([grad1 * scale, grad2], dim=1)


def autograd_jacobians(x: Tensor, scale: float = 1.0) -> Tensor:
    """The Jacobians of :func:`toy_losses` by autograd (the reference of the hand-written ones).

    The points are independent, so the gradient of the sum of one loss over the batch is, row
    by row, that loss's gradient at each point.
    """
    x = x.detach().requires_grad_(True)
    losses = toy_losses(x, scale)
    grads = [
        torch.autograd.grad(losses[:, task].sum(), x, retain_graph=task == 0)[0]
        for task in range(2)
    ]
    return torch.stack(grads, dim=1)
