"""Helpers shared by the tests of the loss weightings: driving a method by hand, reading a
peer's weights as the gradient of its scalarized loss, and the state round trip."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence

import torch
from hypothesis import strategies as st

from gradsurgery._weighting import Decision, Method, TaskStats


def decide(method: Method, losses: Sequence[float], **stats) -> Decision:
    return method.decide(TaskStats(losses=tuple(float(x) for x in losses), **stats))


def step(method: Method, losses: Sequence[float], **stats) -> list[float]:
    """One committed step, as the pipeline runs it; the weights as floats."""
    decision = decide(method, losses, **stats)
    method.commit(decision.state)
    return [float(w) for w in decision.weights]


def gradient_weights(scalarize: Callable[[torch.Tensor], torch.Tensor], losses) -> list[float]:
    """A peer's weights: the gradient of its scalarized loss with respect to the losses."""
    values = torch.tensor(list(losses), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(scalarize(values), values)
    return grad.tolist()


def assert_close(ours: Sequence[float], theirs: Sequence[float], rtol: float, atol: float = 0.0):
    torch.testing.assert_close(
        torch.tensor(list(ours), dtype=torch.float64),
        torch.tensor(list(theirs), dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


def saved(method: Method) -> dict:
    """The method's state through torch.save / torch.load, as a checkpoint holds it."""
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_resumes_bit_exactly(
    build: Callable[[], Method], losses: Sequence[Sequence[float]], at: int, **stats
) -> None:
    """Steps ``at..`` of a method restored from a checkpoint taken after step ``at`` give the
    same weights, to the bit, as those of the method that never stopped."""
    method = build()
    for row in losses[:at]:
        step(method, row, **stats)
    checkpoint = saved(method)
    expected = [step(method, row, **stats) for row in losses[at:]]
    restored = build()
    restored.load_state_dict(checkpoint)
    assert [step(restored, row, **stats) for row in losses[at:]] == expected


def assert_refusal_changes_nothing(method: Method, losses: Sequence[float], match: str) -> None:
    import pytest

    before = copy.deepcopy(method.state_dict())
    with pytest.raises(ValueError, match=match):
        decide(method, losses)
    after = method.state_dict()
    assert repr(after) == repr(before)


def positive_losses(min_tasks: int = 2, max_tasks: int = 10, low: float = 1e-6, high: float = 1e6):
    """Lists of positive losses, spread over ``[low, high]`` in log scale."""
    exponent = st.floats(
        min_value=float(torch.log10(torch.tensor(low))),
        max_value=float(torch.log10(torch.tensor(high))),
    )
    return st.lists(exponent.map(lambda e: 10.0**e), min_size=min_tasks, max_size=max_tasks)


def random_losses(
    num_steps: int, num_tasks: int, seed: int, scale: float = 1.0
) -> list[list[float]]:
    """Positive losses that drift down over the steps, with noise: a training run's shape."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(num_tasks, generator=g, dtype=torch.float64) * 3 + 0.5
    rows = []
    for t in range(num_steps):
        noise = 1 + 0.3 * torch.rand(num_tasks, generator=g, dtype=torch.float64)
        rows.append((scale * base * noise / (1 + 0.1 * t)).tolist())
    return rows
