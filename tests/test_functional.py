"""Mathematical properties of gradsurgery.functional, in float64."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given
from torch import Tensor

from gradsurgery import functional as F
from tests import _properties as props


def pcgrad_direct_loop(grads: Tensor, orders: Tensor, reduction: str) -> Tensor:
    """Algorithm 1 of Yu et al. (2020) written plainly, one vector at a time."""
    projected = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in orders[i].tolist():
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    stacked = torch.stack(projected)
    return stacked.mean(0) if reduction == "mean" else stacked.sum(0)


@st.composite
def task_gradients(draw, min_tasks: int = 1, max_tasks: int = 8) -> Tensor:
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    size = draw(st.integers(1, 64))
    values = draw(
        st.lists(
            st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
            min_size=num_tasks * size,
            max_size=num_tasks * size,
        )
    )
    grads = torch.tensor(values, dtype=torch.float64).reshape(num_tasks, size)
    grads[grads.abs() < 1e-3] = 0.0  # exact zeros, never near-underflow dot products
    zero_rows = draw(st.lists(st.integers(0, num_tasks - 1), max_size=2))
    grads[zero_rows] = 0.0
    scale = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    return grads * scale


@st.composite
def gradients_and_orders(draw, min_tasks: int = 1, max_tasks: int = 8) -> tuple[Tensor, Tensor]:
    grads = draw(task_gradients(min_tasks, max_tasks))
    seed = draw(st.integers(0, 2**32 - 1))
    orders = F.projection_orders(grads.shape[0], generator=torch.Generator().manual_seed(seed))
    return grads, orders


def combine_mean(grads: Tensor, orders: Tensor) -> Tensor:
    return F.pcgrad(grads, orders=orders, reduction="mean")


def combine_sum(grads: Tensor, orders: Tensor) -> Tensor:
    return F.pcgrad(grads, orders=orders, reduction="sum")


COMBINERS = {"mean": combine_mean, "sum": combine_sum}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(data=gradients_and_orders())
def test_gramian_implementation_equals_direct_loop(reduction, data):
    grads, orders = data
    expected = pcgrad_direct_loop(grads, orders, reduction)
    actual = F.pcgrad(grads, orders=orders, reduction=reduction)
    torch.testing.assert_close(actual, expected, **props.tolerance(grads))


# The Python and NumPy surgeries add up the same products, but NumPy's summation order is its
# own (pairwise from 8 terms on; it changed between NumPy 2.4 and 2.5): they agree to float64
# rounding, not to the bit. Where a projected gradient is orthogonal to a partner in exact
# arithmetic (a partner parallel to an earlier one), the sign of the rounded dot product may
# differ: one path projects by a rounding-size amount, the other does not.
def assert_same_surgery(
    ours: tuple[np.ndarray, np.ndarray], numpy: tuple[np.ndarray, np.ndarray], G: np.ndarray
) -> None:
    """The same projected gradients, and the same projections but for those that move a
    gradient by rounding only. ``ours`` and ``numpy`` are (coefficients, projected): the
    ``[T, T]`` coefficients of the projected gradients (``[T]`` once reduced, for ``ours``;
    only ``numpy``'s full matrix then places the projections) and the ``[T, T]`` projections.
    Coefficients are compared scaled by the norm of the gradient each one multiplies."""
    norms = np.sqrt(np.maximum(G.diagonal(), 0.0))
    rounding = 1e-10 * max(norms.max(), np.finfo(float).tiny)
    moved = [coefficients * norms for coefficients in (ours[0], numpy[0])]
    np.testing.assert_allclose(moved[0], moved[1], rtol=1e-12, atol=rounding)
    differ = ours[1] != numpy[1]
    for displacement in moved:
        if displacement.ndim == 2:
            assert np.all(np.abs(displacement[differ]) <= rounding)


@given(data=gradients_and_orders(max_tasks=F._PYTHON_MAX_TASKS))
def test_python_surgery_equals_numpy(data):
    # Up to _PYTHON_MAX_TASKS the surgery runs on Python floats instead of NumPy: the same
    # coefficients and projections.
    grads, orders = data
    G, order_array = F.gramian(grads).numpy(), orders.numpy()
    python = F._pcgrad_coefficients_python(G, order_array)
    numpy = F._pcgrad_coefficients_numpy(G, order_array)
    assert_same_surgery(python, numpy, G)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(grads=task_gradients(max_tasks=F._PYTHON_MAX_TASKS), seed=st.integers(0, 2**32 - 1))
def test_pcgrads_step_path_equals_numpy(reduction, grads, seed):
    # What PCGrad runs each step (orders drawn, surgery, reduction) against the NumPy pieces:
    # the same orders from the same generator, so the same surgery.
    G = F.gramian(grads).numpy()
    weights, projected = F._pcgrad_weights(
        G.tolist(), torch.Generator().manual_seed(seed), reduction
    )
    orders = F._projection_orders(G.shape[0], torch.Generator().manual_seed(seed))
    coefficients, expected_projected = F._pcgrad_coefficients_numpy(G, orders)
    expected = F._reduce_coefficients(coefficients, reduction)
    ours = (np.asarray(weights), F._projection_matrix(projected, G.shape[0]))
    assert_same_surgery(ours, (expected, expected_projected), G)
    # Where the projections differ, NumPy's coefficient says by how much: rounding only.
    differ = ours[1] != expected_projected
    norms = np.sqrt(np.maximum(G.diagonal(), 0.0))
    assert np.all(np.abs((coefficients * norms)[differ]) <= 1e-10 * max(norms.max(), 1e-300))


@given(data=gradients_and_orders(min_tasks=2, max_tasks=2))
def test_two_tasks_match_closed_form(data):
    grads, orders = data
    g1, g2 = grads
    dot = g1 @ g2
    if dot < 0:
        p1 = g1 - dot / (g2 @ g2) * g2
        p2 = g2 - dot / (g1 @ g1) * g1
    else:
        p1, p2 = g1, g2
    torch.testing.assert_close(
        F.pcgrad(grads, orders=orders), (p1 + p2) / 2, **props.tolerance(grads)
    )


@given(data=gradients_and_orders(min_tasks=2, max_tasks=2))
def test_two_tasks_no_longer_conflict_after_projection(data):
    grads, orders = data
    coefficients, _ = F.pcgrad_coefficients(F.gramian(grads), orders)
    projected = coefficients @ grads
    scale = float(grads.abs().max()) ** 2
    assert projected[0] @ grads[1] >= -1e-9 * max(scale, 1.0)
    assert projected[1] @ grads[0] >= -1e-9 * max(scale, 1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(data=gradients_and_orders())
def test_no_conflict_gives_plain_reduction(reduction, data):
    grads, orders = data
    grads = grads.abs()  # all dot products >= 0
    reduce = (lambda g: g.mean(0)) if reduction == "mean" else (lambda g: g.sum(0))
    props.assert_plain_when_no_conflict(COMBINERS[reduction], grads, orders, reduce)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(data=gradients_and_orders(), c=st.floats(1e-3, 1e3))
def test_linear_under_positive_scaling(reduction, data, c):
    grads, orders = data
    props.assert_linear_under_scaling(COMBINERS[reduction], grads, orders, c)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@given(data=gradients_and_orders(), seed=st.integers(0, 2**32 - 1))
def test_permuting_tasks_with_their_orders_changes_nothing(reduction, data, seed):
    grads, orders = data
    permutation = torch.randperm(grads.shape[0], generator=torch.Generator().manual_seed(seed))
    props.assert_permutation_invariant(COMBINERS[reduction], grads, orders, permutation)


@given(data=gradients_and_orders())
def test_output_is_finite_even_with_zero_gradients(data):
    grads, orders = data
    props.assert_finite(combine_mean, grads, orders)


def test_all_zero_gradients_give_zero_not_nan():
    grads = torch.zeros(4, 10, dtype=torch.float64)
    assert torch.equal(F.pcgrad(grads), torch.zeros(10, dtype=torch.float64))


def test_single_task_is_the_plain_gradient():
    grads = torch.randn(1, 7, dtype=torch.float64)
    assert torch.equal(F.pcgrad(grads), grads[0])


def test_projection_is_onto_the_original_gradients():
    # g0 conflicts with g1 and g2; after projecting on g1, the next projection must use the
    # original g2, not a projected one. A direct hand computation with order (1, 2):
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    orders = torch.tensor([[1, 2], [0, 2], [0, 1]])
    coefficients, projected = F.pcgrad_coefficients(F.gramian(g), orders)
    step1 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]  # [0.5, 0.5, 0]
    step2 = step1 - (step1 @ g[2]) / (g[2] @ g[2]) * g[2]  # dot = -0.5 < 0
    torch.testing.assert_close(coefficients[0] @ g, step2)
    assert projected[0].tolist() == [False, True, True]


@given(num_tasks=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_projection_orders_are_permutations_of_the_other_tasks(num_tasks, seed):
    orders = F.projection_orders(num_tasks, generator=torch.Generator().manual_seed(seed))
    assert orders.shape == (num_tasks, num_tasks - 1)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(num_tasks) if j != i]


def test_projection_orders_are_reproducible_and_vary():
    draw = [F.projection_orders(5, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    generator = torch.Generator().manual_seed(3)
    distinct = {
        tuple(F.projection_orders(5, generator=generator).flatten().tolist()) for _ in range(20)
    }
    assert len(distinct) > 10


def test_projection_orders_are_uniform():
    generator = torch.Generator().manual_seed(0)
    firsts = torch.stack([F.projection_orders(4, generator=generator)[0] for _ in range(3000)])
    counts = torch.bincount(firsts[:, 0], minlength=4)
    assert counts[0] == 0
    assert (counts[1:] - 1000).abs().max() < 120  # ~4 standard deviations


def test_cosine_and_conflicts_from_gramian():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    G = F.gramian(grads)
    cos = F.cosine_similarity_matrix(G)
    torch.testing.assert_close(cos[0, 1], torch.tensor(-1.0, dtype=torch.float64))
    assert cos[2].eq(0).all()  # the zero gradient: zero, not NaN
    assert F.conflicting_pairs(G) == 1


@given(data=gradients_and_orders(), alpha=st.floats(0, 3))
def test_gradnorm_targets_keep_the_mean_norm_scale(data, alpha):
    grads, _ = data
    norms = grads.norm(dim=1) + 0.1
    ratios = torch.linspace(0.5, 1.5, grads.shape[0], dtype=torch.float64)
    targets = F.gradnorm_targets(norms, ratios, alpha)
    relative = ratios / ratios.mean()
    torch.testing.assert_close(targets, norms.mean() * relative**alpha)
    if alpha == 0:
        torch.testing.assert_close(targets, norms.mean().expand_as(targets))


def test_pcgrad_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        F.pcgrad(torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        F.pcgrad(torch.zeros(2, 3), reduction="max")
    with pytest.raises(ValueError, match="orders"):
        F.pcgrad_coefficients(torch.eye(3), torch.zeros(3, 1, dtype=torch.long))


def test_pcgrads_step_draws_its_orders_even_without_conflicts():
    # The generator's stream must not depend on the data: a resumed or rerun training draws
    # the same orders whatever the conflicts of earlier steps were.
    agreeing = F.gramian(torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]]))
    conflicting = F.gramian(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    states = []
    for G in (agreeing, conflicting):
        generator = torch.Generator().manual_seed(7)
        weights, projections = F._pcgrad_weights(G.numpy(), generator, "mean")
        states.append(generator.get_state())
        if G is agreeing:
            assert weights == [1 / 3] * 3 and projections == []
        else:
            assert projections
    assert torch.equal(states[0], states[1])
