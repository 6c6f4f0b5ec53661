"""The pipeline's gradient helpers: the weighted gradient straight from the engine, and the
finiteness checks it runs on every update before it writes ``.grad``."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from gradsurgery._autograd import seeded_grad
from gradsurgery._grads import all_finite, fresh_all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
    where=st.integers(0, 10_000),
)
def test_both_checks_find_any_nonfinite_element_and_keep_every_bit(sizes, dtype, bad, where):
    tensors = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    if bad is not None:
        k = where % len(tensors)
        tensors[k][where % sizes[k]] = bad
    before = [t.clone() for t in tensors]
    assert all_finite(tensors) == (bad is None)
    assert fresh_all_finite(tensors) == (bad is None)
    for t, b in zip(tensors, before, strict=True):  # the fused kernel multiplied by 1 in place
        assert torch.equal(bits(t), bits(b))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_a_sum_that_overflows_is_not_taken_for_an_inf():
    big = torch.full((4,), torch.finfo(torch.float32).max)
    assert all_finite([big, big])
    assert fresh_all_finite([big, big])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_expanded_gradient_takes_the_per_tensor_check(bad):
    # A scalar's gradient broadcast by sum(): one memory location for every element.
    expanded = torch.tensor(bad).expand(5)
    assert not fresh_all_finite([torch.ones(3), expanded])
    assert fresh_all_finite([torch.ones(3), torch.tensor(2.0).expand(5)])


def test_the_fused_check_forgets_a_nonfinite_element_it_found_before():
    # Its flag tensor is kept between calls: each call must clear it.
    assert not fresh_all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert fresh_all_finite([torch.ones(3), torch.ones(2)])


def test_each_thread_checks_with_its_own_flag():
    def check(bad: bool) -> bool:
        tensors = [torch.ones(1000) for _ in range(4)]
        if bad:
            tensors[-1][-1] = float("inf")
        return all(fresh_all_finite(tensors) != bad for _ in range(200))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, [True, False] * 8))


class _Subclass(torch.Tensor):
    pass


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["plain", "subclass", "function-mode"])
def test_seeded_grad_is_autograd_grad(kind):
    torch.manual_seed(0)
    body, head, unused = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    params = [*body.parameters(), *head.parameters(), *unused.parameters()]
    seeds = [torch.tensor(0.25), torch.tensor(-1.5)]

    def losses():
        out = head(torch.tanh(body(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)))))
        found = [out[:, 0].pow(2).mean(), out[:, 1].mean()]
        return [x.as_subclass(_Subclass) for x in found] if kind == "subclass" else found

    expected = torch.autograd.grad(losses(), params, seeds, allow_unused=True)
    mode = _PassThrough() if kind == "function-mode" else None
    with mode if mode is not None else contextlib.nullcontext():
        found = seeded_grad(losses(), seeds, params)
    assert found[-1] is None and found[-2] is None  # the unused layer
    for f, e in zip(found, expected, strict=True):
        assert (f is None and e is None) or torch.equal(f, e)
