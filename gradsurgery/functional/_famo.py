"""FAMO (Liu, Feng, Stone & Liu 2023): the weights of ``sum_i z_i log(L_i - b_i + eps) / c``
and the logits' update from the change of the log-losses across a step."""

from __future__ import annotations

import math

from torch import Tensor

from ._losses import FloatVector, float64, task_vectors

__all__ = ["famo_logit_gradient", "famo_weights"]

EPSILON = 1e-8  # the authors' constant inside the logarithm


def famo_weights(
    losses: FloatVector, logits: FloatVector, min_losses: FloatVector | None = None
) -> Tensor:
    """FAMO's task weights: the gradient of ``c^-1 sum_i z_i log(D_i)`` with respect to the losses.

    ``z = softmax(logits)``, ``D_i = L_i - b_i + eps`` with the lower bounds ``b`` (``min_losses``)
    and ``eps = 1e-8``, and ``c = sum_i z_i / D_i`` held constant (the authors' ``.detach()``), so
    ``w_i = z_i / (c D_i)``: positive and summing to one.

    Parameters
    ----------
    losses : sequence of float or Tensor
        ``[T]`` losses, each at or above its lower bound.
    logits : sequence of float or Tensor
        ``[T]`` task logits ``w``.
    min_losses : sequence of float or Tensor, optional
        ``[T]`` lower bounds ``b`` of the losses; zeros when ``None``.

    Returns
    -------
    Tensor
        ``[T]`` float64 weights.

    Examples
    --------
    >>> from gradsurgery.functional import famo_weights
    >>> famo_weights([1.0, 3.0], [0.0, 0.0])
    tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    losses, logits, min_losses = _check(losses, logits, min_losses)
    return float64(_famo_weights(losses, _softmax(logits), min_losses))


def famo_logit_gradient(
    logits: FloatVector,
    previous_losses: FloatVector,
    losses: FloatVector,
    min_losses: FloatVector | None = None,
) -> Tensor:
    """The gradient FAMO's logit optimizer descends, from the losses before and after a step.

    ``delta_i = log(D_i^before) - log(D_i^after)`` is how much task ``i``'s log-loss fell; the
    gradient is ``J_softmax(logits)^T delta = z * (delta - z . delta)``, as the authors' code
    computes it with ``autograd.grad(softmax(w), w, grad_outputs=delta)``. Descending it moves
    weight towards the tasks whose loss fell least.

    Parameters
    ----------
    logits : sequence of float or Tensor
        ``[T]`` task logits.
    previous_losses, losses : sequence of float or Tensor
        ``[T]`` losses before and after the step, at or above their lower bounds.
    min_losses : sequence of float or Tensor, optional
        ``[T]`` lower bounds; zeros when ``None``.

    Returns
    -------
    Tensor
        ``[T]`` float64 gradient; it sums to zero.

    Examples
    --------
    >>> import math
    >>> from gradsurgery.functional import famo_logit_gradient
    >>> famo_logit_gradient([0.0, 0.0], [1.0, 1.0], [math.exp(-1.0), 1.0])
    tensor([ 0.2500, -0.2500], dtype=torch.float64)
    """
    previous_losses, _ = task_vectors(previous_losses=previous_losses, losses=losses)
    losses, logits, min_losses = _check(losses, logits, min_losses)
    _check_bounds(previous_losses, min_losses)
    return float64(_logit_gradient(_softmax(logits), previous_losses, losses, min_losses))


def _check(
    losses: FloatVector, logits: FloatVector, min_losses: FloatVector | None
) -> tuple[list[float], list[float], list[float]]:
    losses, logits, min_losses = task_vectors(losses=losses, logits=logits, min_losses=min_losses)
    min_losses = min_losses or [0.0] * len(losses)
    _check_bounds(losses, min_losses)
    return losses, logits, min_losses


def _check_bounds(losses: list[float], min_losses: list[float]) -> None:
    bad = [i for i, (loss, b) in enumerate(zip(losses, min_losses, strict=True)) if loss < b]
    if bad:
        raise ValueError(
            f"FAMO takes log(loss - min_loss), but the loss of task(s) {', '.join(map(str, bad))} "
            f"is below its lower bound ({', '.join(f'{losses[i]:.6g}' for i in bad)} < "
            f"{', '.join(f'{min_losses[i]:.6g}' for i in bad)}); pass min_losses that bound "
            "the losses from below"
        )


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _famo_weights(losses: list[float], z: list[float], min_losses: list[float]) -> list[float]:
    ratios = [zi / (loss - b + EPSILON) for zi, loss, b in zip(z, losses, min_losses, strict=True)]
    total = math.fsum(ratios)
    return [r / total for r in ratios]


def _logit_gradient(
    z: list[float], previous: list[float], losses: list[float], min_losses: list[float]
) -> list[float]:
    delta = [  # log D_before - log D_after, as one logarithm of their ratio
        math.log((p - b + EPSILON) / (loss - b + EPSILON))
        for p, loss, b in zip(previous, losses, min_losses, strict=True)
    ]
    mean = math.fsum(zi * d for zi, d in zip(z, delta, strict=True))
    return [zi * (d - mean) for zi, d in zip(z, delta, strict=True)]


def adam_step(
    param: list[float],
    grad: list[float],
    state: tuple[int, list[float], list[float]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[list[float], tuple[int, list[float], list[float]]]:
    """One step of ``torch.optim.Adam`` (L2 weight decay, no amsgrad) on Python floats, in
    torch's order of operations; returns the new parameters and ``(step, exp_avg, exp_avg_sq)``
    instead of mutating, so that a refused step can drop them."""
    beta1, beta2 = betas
    step, exp_avg, exp_avg_sq = state
    step += 1
    step_size = lr / (1 - beta1**step)
    root_correction = math.sqrt(1 - beta2**step)
    params, averages, squares = [], [], []
    # torch's operations in torch's order (its kernels may fuse a multiply-add: the last bit
    # can differ); one pass over the T values.
    for p, g, m, v in zip(param, grad, exp_avg, exp_avg_sq, strict=True):
        if weight_decay:
            g = g + weight_decay * p
        m = m + (g - m) * (1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        params.append(p - step_size * m / (math.sqrt(v) / root_correction + eps))
        averages.append(m)
        squares.append(v)
    return params, (step, averages, squares)
