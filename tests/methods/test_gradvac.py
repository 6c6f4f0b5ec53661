"""GradVac: against torchjd and LibMTL's loop on vectors, and the cosine it aims at."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation._gradvac import GradVacWeighting

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import gradvac_weights, projection_orders
from gradsurgery.methods.gradvac import GradVac

from ._jacobians import cases, random_jacobian
from ._pipeline import step_through_optimizer


def torchjd_orders(num_tasks: int, seed: int) -> torch.Tensor:
    """The orders torchjd draws after ``torch.manual_seed(seed)``: one randperm per task."""
    torch.manual_seed(seed)
    rows = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        rows.append([others[k] for k in torch.randperm(len(others)).tolist()])
    return torch.tensor(rows, dtype=torch.long).reshape(num_tasks, num_tasks - 1)


def libmtl_gradvac(grads, rho, orders, beta):
    """LibMTL's GradVac.backward (LibMTL/weighting/GradVac.py, group_type 0, whole model) on
    the gradient vectors, with its random.shuffle replaced by the given orders."""
    rho = rho.clone()
    pc_grads = grads.clone()
    for i, order in enumerate(orders.tolist()):
        for j in order:
            rho_ij = torch.dot(pc_grads[i], grads[j]) / (
                pc_grads[i].norm() * grads[j].norm() + 1e-8
            )
            if rho_ij < rho[i, j]:
                w = (
                    pc_grads[i].norm()
                    * (rho[i, j] * (1 - rho_ij**2).sqrt() - rho_ij * (1 - rho[i, j] ** 2).sqrt())
                    / (grads[j].norm() * (1 - rho[i, j] ** 2).sqrt() + 1e-8)
                )
                pc_grads[i] += grads[j] * w
            rho[i, j] = (1 - beta) * rho[i, j] + beta * rho_ij
    return pc_grads.sum(0), rho


def steps(J: torch.Tensor, count: int = 3):
    """``count`` Jacobians: ``J``, then ``J`` plus noise, as a run would see."""
    g = torch.Generator().manual_seed(J.shape[0])
    for step in range(count):
        noise = torch.randn(J.shape, dtype=J.dtype, generator=g) * J.norm(dim=1, keepdim=True)
        yield step, (J + 0.1 * step * noise / math.sqrt(J.shape[1]))


# Exactly opposite gradients cancel g_i' to rounding level, where the peers' cosines are
# rounding noise over eps; tested separately below.
PEER_CASES = [
    (n, J) for n, J in cases() if n not in ("conflicting-pair", "conflicting-scaled-pair")
]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("name", "J"), PEER_CASES)
def test_agrees_with_torchjd_over_steps(name, J, beta):
    theirs = GradVacWeighting(beta=beta)
    targets = None
    for step, J_step in steps(J):
        G = J_step @ J_step.T
        orders = torchjd_orders(J.shape[0], step)
        weights, targets = gradvac_weights(G, targets, beta=beta, orders=orders)
        torch.manual_seed(step)
        expected = theirs(G)
        scale = float(expected.abs().max())
        torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-9 * scale)
        torch.testing.assert_close(targets, theirs._phi_t, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("name", "J"), PEER_CASES)
def test_agrees_with_libmtl_on_vectors(name, J):
    rho = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64)
    targets = None
    for step, J_step in steps(J):
        orders = projection_orders(J.shape[0], generator=torch.Generator().manual_seed(step))
        weights, targets = gradvac_weights(J_step @ J_step.T, targets, orders=orders)
        expected, rho = libmtl_gradvac(J_step, rho, orders, 0.5)
        torch.testing.assert_close(
            weights @ J_step, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max())
        )
        torch.testing.assert_close(targets, rho, rtol=0, atol=1e-9)


def test_a_cancelled_gradient_has_cosine_zero():
    g = random_jacobian(2, 3)
    J = torch.stack([g[0], -g[0], g[1]])
    orders = torch.tensor([[1, 2], [0, 2], [0, 1]])
    weights, targets = gradvac_weights(J @ J.T, orders=orders)
    # g_1' = g_1 + 1 * g_2 = 0 exactly in exact arithmetic: its cosine with g_3 counts as 0.
    assert targets[0, 1] == pytest.approx(-0.5) and targets[0, 2] == 0.0
    assert torch.isfinite(weights).all()


def test_zero_gradients():
    J = random_jacobian(3, 4)
    J[1] = 0.0
    weights, targets = gradvac_weights(J @ J.T, orders=torch.tensor([[1, 2], [0, 2], [0, 1]]))
    assert targets[:, 1].tolist() == [0.0, 0.0, 0.0] and targets[1].tolist() == [0.0] * 3
    weights, _ = gradvac_weights(torch.zeros(2, 2), orders=torch.tensor([[1], [0]]))
    assert weights.tolist() == [1.0, 1.0]


def test_single_task_is_its_gradient():
    weights, targets = gradvac_weights(torch.tensor([[2.0]]))
    assert weights.tolist() == [1.0] and targets.tolist() == [[0.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"eps": -1e-8}, "eps"),
        ({"targets": torch.zeros(3, 3)}, "targets"),
        ({"targets": torch.full((2, 2), float("nan"))}, "targets"),
        ({"orders": torch.tensor([[0], [1]])}, "orders"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradvac_weights(torch.eye(2), **kwargs)


jacobians = st.builds(
    random_jacobian, st.integers(2, 6), st.integers(0, 2**31 - 1), st.integers(8, 16)
)
cosines = st.floats(-0.99, 0.99)


@given(st.integers(0, 2**31 - 1), cosines, cosines)
def test_a_correction_lifts_the_cosine_to_its_target(seed, target_01, target_10):
    # Two tasks, eps = 0 (the paper's formula): g_i' has exactly the target cosine with g_j
    # when it started below it, and is g_i otherwise.
    J = random_jacobian(2, seed)
    targets = torch.tensor([[0.0, target_01], [target_10, 0.0]], dtype=torch.float64)
    weights, _ = gradvac_weights(J @ J.T, targets, eps=0.0, orders=torch.tensor([[1], [0]]))
    corrected = [J[0] + (weights[1] - 1) * J[1], J[1] + (weights[0] - 1) * J[0]]
    for i, j, target in [(0, 1, target_01), (1, 0, target_10)]:
        before = float(torch.cosine_similarity(J[i], J[j], dim=0))
        after = float(torch.cosine_similarity(corrected[i], J[j], dim=0))
        assert after == pytest.approx(max(before, target), abs=1e-9)


@given(jacobians, st.floats(-6, 6), st.floats(0, 1))
def test_scale_free_without_eps(J, log_scale, beta):
    s = 10.0**log_scale
    orders = projection_orders(J.shape[0], generator=torch.Generator().manual_seed(0))
    targets = torch.rand(J.shape[0], J.shape[0], dtype=torch.float64) * 1.8 - 0.9
    G = J @ J.T
    weights, new_targets = gradvac_weights(G, targets, beta=beta, eps=0.0, orders=orders)
    scaled, scaled_targets = gradvac_weights(s * G, targets, beta=beta, eps=0.0, orders=orders)
    torch.testing.assert_close(scaled, weights, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(scaled_targets, new_targets, rtol=0, atol=1e-9)


@given(jacobians, st.randoms(use_true_random=False))
def test_relabelling_the_tasks_relabels_the_weights(J, rng):
    num_tasks = J.shape[0]
    permutation = list(range(num_tasks))
    rng.shuffle(permutation)
    permutation = torch.tensor(permutation)
    orders = projection_orders(num_tasks, generator=torch.Generator().manual_seed(1))
    targets = torch.rand(num_tasks, num_tasks, dtype=torch.float64) - 0.5
    G = J @ J.T
    weights, new_targets = gradvac_weights(G, targets, orders=orders)
    inverse = torch.argsort(permutation)
    permuted, permuted_targets = gradvac_weights(
        G[permutation][:, permutation],
        targets[permutation][:, permutation],
        orders=inverse[orders[permutation]],
    )
    torch.testing.assert_close(permuted, weights[permutation], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(permuted_targets, new_targets[permutation][:, permutation])


def stats_of(J: torch.Tensor) -> TaskStats:
    return TaskStats(losses=(1.0,) * J.shape[0], gramian_rows=(J @ J.T).tolist())


def test_decide_commit_and_the_functional_agree():
    method = GradVac(beta=0.3, generator=torch.Generator().manual_seed(5))
    J = random_jacobian(4, 8)
    decision = method.decide(stats_of(J))
    assert method.targets is None  # nothing kept before commit
    orders = projection_orders(4, generator=torch.Generator().manual_seed(5))
    weights, targets = gradvac_weights(J @ J.T, beta=0.3, orders=orders)
    torch.testing.assert_close(torch.tensor(decision.weights, dtype=torch.float64), weights)
    assert torch.equal(method.generator.get_state(), torch.Generator().manual_seed(5).get_state())
    method.commit(decision.state)
    torch.testing.assert_close(method.targets, targets)
    assert method.needs is Needs.GRAMIAN and method.unshared == "sum"
    assert repr(method) == "GradVac(beta=0.3, eps=1e-08)"


def test_state_round_trip_continues_bit_for_bit():
    jacobians = [random_jacobian(3, seed) for seed in range(6)]
    method = GradVac(generator=torch.Generator().manual_seed(2))
    for J in jacobians[:3]:
        method.commit(method.decide(stats_of(J)).state)
    restored = GradVac(generator=torch.Generator().manual_seed(99))
    restored.load_state_dict(method.state_dict())
    for J in jacobians[3:]:
        ours, theirs = method.decide(stats_of(J)), restored.decide(stats_of(J))
        assert ours.weights == theirs.weights
        method.commit(ours.state)
        restored.commit(theirs.state)
    assert torch.equal(method.targets, restored.targets)


def test_bad_state_and_task_count_change_nothing():
    method = GradVac(generator=torch.Generator().manual_seed(2))
    method.commit(method.decide(stats_of(random_jacobian(3, 0))).state)
    before = method.state_dict()
    for bad in [
        {"targets": None},
        {"targets": torch.zeros(2, 3), "generator": before["generator"]},
        {"targets": None, "generator": torch.zeros(3, dtype=torch.uint8)},
        {"targets": [[0.0, 1.0], [0.0]], "generator": before["generator"]},
        {"targets": 3.0, "generator": before["generator"]},
    ]:
        with pytest.raises(ValueError, match="GradVac"):
            method.load_state_dict(bad)
    with pytest.raises(ValueError, match="targets are for 3 tasks, got 2"):
        method.decide(stats_of(random_jacobian(2, 0)))
    after = method.state_dict()
    assert torch.equal(after["targets"], before["targets"])
    assert torch.equal(after["generator"], before["generator"])
    method.reset()
    assert method.targets is None
    method.decide(stats_of(random_jacobian(2, 0)))


@pytest.mark.parametrize("kwargs", [{"beta": -0.1}, {"eps": float("inf")}, {"generator": "seed"}])
def test_bad_hyper_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        GradVac(**kwargs)


def test_through_the_optimizer():
    method = GradVac(generator=torch.Generator().manual_seed(4))
    J, shared_grad, head_grads, expected_heads = step_through_optimizer(method)
    orders = projection_orders(3, generator=torch.Generator().manual_seed(4))
    weights, targets = gradvac_weights((J @ J.T).double(), orders=orders)
    torch.testing.assert_close(shared_grad, weights.float() @ J, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grads, [tuple(g) for g in expected_heads])
    torch.testing.assert_close(method.targets, targets, rtol=1e-5, atol=1e-6)  # committed
