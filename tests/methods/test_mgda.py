"""MGDA: the exact min-norm solver against torchjd, a generic QP solver and the KKT conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from qpsolvers import solve_qp
from scipy.sparse import csc_matrix
from torchjd.aggregation._mgda import MGDAWeighting

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import mgda_weights
from gradsurgery.methods.mgda import MGDA

from ._gramian_properties import direction_error, jacobians, permutations
from ._jacobians import cases


def reference_min_norm(G: torch.Tensor) -> torch.Tensor:
    """min w^T G w on the simplex by Clarabel (an interior-point solver), at unit scale."""
    T = G.shape[0]
    scale = float(G.diagonal().max()) or 1.0
    w = solve_qp(
        csc_matrix((G / scale).numpy()),
        np.zeros(T),
        A=csc_matrix(np.ones((1, T))),
        b=np.ones(1),
        lb=np.zeros(T),
        solver="clarabel",
        tol_gap_abs=1e-12,
        tol_gap_rel=1e-12,
        tol_feas=1e-12,
    )
    return torch.from_numpy(w)


def assert_kkt(G: torch.Tensor, w: torch.Tensor) -> None:
    """Weights on the simplex; every task's (G w)_i >= w^T G w, with equality where w_i > 0."""
    scale = float(G.diagonal().max()) or 1.0
    tolerance = 1e-9 * scale
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    products = G @ w
    value = float(w @ products)
    assert (products >= value - tolerance).all()
    active = w > 1e-9
    assert ((products[active] - value).abs() <= tolerance).all()


@pytest.mark.parametrize(("name", "J"), cases())
def test_agrees_with_a_qp_solver_and_beats_torchjd(name, J):
    """An interior-point QP solver gives the same minimum-norm direction to 1e-6; torchjd runs
    Frank-Wolfe, stopped at a step below 1e-3, so it lands near it, never below it."""
    G = J @ J.T
    ours = mgda_weights(G)
    assert direction_error(J, ours, reference_min_norm(G)) < 1e-5, name
    theirs = MGDAWeighting()(G)
    assert direction_error(J, ours, theirs) < 0.05, name
    slack = 1e-12 * float(G.diagonal().max())
    assert float(ours @ G @ ours) <= float(theirs @ G @ theirs) + slack, name


@given(jacobians())
def test_kkt_conditions(J):
    G = J @ J.T
    assert_kkt(G, mgda_weights(G))


@given(jacobians(), st.sampled_from(["l2", "loss", "loss+"]))
def test_kkt_conditions_of_the_normalized_problem(J, normalization):
    G = J @ J.T
    losses = torch.linspace(0.5, 2.0, J.shape[0], dtype=torch.float64)
    norms = G.diagonal().sqrt().clamp_min(0).where(G.diagonal() > 0, torch.ones(()))
    normalizer = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    w = mgda_weights(G, losses, normalization=normalization)
    assert_kkt(G / torch.outer(normalizer, normalizer), w)
    normalized = mgda_weights(G, losses, normalization=normalization, combine="normalized")
    torch.testing.assert_close(normalized, w / normalizer, rtol=1e-12, atol=0)


@given(jacobians().flatmap(lambda J: st.tuples(st.just(J), permutations(J.shape[0]))))
def test_permuting_the_tasks_permutes_the_direction(case):
    J, permutation = case
    G = J @ J.T
    w = mgda_weights(G)
    permuted = mgda_weights(G[permutation][:, permutation])
    d = J.T @ w
    d_permuted = J[permutation].T @ permuted
    assert float((d - d_permuted).norm()) <= 1e-7 * float(J.norm(dim=1).max())


@given(jacobians(), st.floats(1e-4, 1e4))
def test_scaling_every_gradient_scales_the_direction(J, factor):
    """The weights depend only on the directions' geometry: scaling J leaves them unchanged."""
    G = J @ J.T
    d = J.T @ mgda_weights(G)
    d_scaled = (factor * J).T @ mgda_weights(factor**2 * G)
    assert float((d_scaled - factor * d).norm()) <= 1e-7 * factor * float(J.norm(dim=1).max())


def test_loss_normalizations_follow_the_authors():
    """Sener and Koltun's gradient_normalizers: 1, ||g||, L, L ||g||."""
    G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # norms 2 and 1
    losses = [1.0, 4.0]
    # l2: unit gradients, weights 1/2 each on the raw losses.
    torch.testing.assert_close(
        mgda_weights(G, normalization="l2"), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    # loss: g / L = (2, 0.25) in norm -> min-norm weights 0.25^2 / (4 + 0.25^2) on the first.
    w = mgda_weights(G, losses, normalization="loss")
    torch.testing.assert_close(w, torch.tensor([0.0625 / 4.0625, 4 / 4.0625], dtype=torch.float64))
    # loss+: g / (L ||g||) = (1, 0.25) in norm.
    w = mgda_weights(G, losses, normalization="loss+")
    torch.testing.assert_close(w, torch.tensor([0.0625 / 1.0625, 1 / 1.0625], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normalization": "max"}, "normalization must be one of"),
        ({"combine": "both"}, "combine must be one of"),
        ({"normalization": "loss"}, "pass losses"),
        ({"normalization": "loss", "losses": [1.0, 0.0]}, "not positive"),
        ({"normalization": "loss+", "losses": [1.0, float("nan")]}, "NaN"),
        ({"normalization": "loss", "losses": [1.0]}, "one entry per task"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mgda_weights(torch.eye(2), **kwargs)


@pytest.mark.parametrize(
    "gramian",
    [
        torch.ones(2, 3),
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        -torch.eye(2),
        torch.zeros(0, 0),
    ],
)
def test_bad_gramians_raise(gramian):
    with pytest.raises(ValueError):
        mgda_weights(gramian)


def test_degenerate_cases():
    assert mgda_weights(torch.ones(1, 1)).tolist() == [1.0]  # T = 1
    assert mgda_weights(torch.zeros(3, 3)).tolist() == [1 / 3] * 3  # all zero: uniform
    w = mgda_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # a zero gradient: d = 0
    assert w.tolist() == [0.0, 1.0]
    w = mgda_weights(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # opposed: d = 0
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    w = mgda_weights(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))  # identical: any split
    assert abs(float(w.sum()) - 1) < 1e-15 and (w >= 0).all()


def test_method_decides_from_the_gramian_and_losses():
    method = MGDA(normalization="loss")
    assert method.needs == Needs.GRAMIAN
    stats = TaskStats(losses=(1.0, 4.0), gramian_rows=[[4.0, 0.0], [0.0, 1.0]])
    decision = method.decide(stats)
    expected = mgda_weights(stats.gramian, stats.losses, normalization="loss").tolist()
    assert decision.weights == expected and decision.state is None
    assert repr(method) == "MGDA(normalization='loss', combine='raw')"
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="L2")
    with pytest.raises(ValueError, match="combine"):
        MGDA(combine="mean")
