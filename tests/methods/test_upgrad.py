"""UPGrad: the dual-cone projections against torchjd (quadprog), a QP solver, and J d >= 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import nnls
from torchjd.aggregation._upgrad import UPGradWeighting

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import upgrad_weights
from gradsurgery.methods.upgrad import UPGrad

from ._gramian_properties import direction_error, jacobians, permutations, relative_error
from ._jacobians import cases

TORCHJD_EPS = {"norm_eps": 1e-4, "reg_eps": 1e-4}


def reference_projection(J: torch.Tensor, u: np.ndarray) -> np.ndarray:
    """argmin_{v >= u} ||J^T v||, as scipy's NNLS on J itself: v = u + z,
    z = argmin_{z >= 0} ||J^T z + J^T u||."""
    A = J.T.numpy()
    return u + nnls(A, -(A @ u), maxiter=1000)[0]


def assert_no_conflict(G: torch.Tensor, w: torch.Tensor) -> None:
    """J (J^T w) = G w >= 0: to first order, the update raises no task's loss."""
    assert (G @ w >= -1e-9 * float(G.diagonal().max())).all()


@pytest.mark.parametrize(("name", "J"), cases())
def test_agrees_with_torchjd_with_its_conditioning(name, J):
    """torchjd normalizes the Gramian by its trace and adds 1e-4 I, then solves with quadprog
    (an exact active-set method): the same options give the same weights."""
    G = J @ J.T
    ours = upgrad_weights(G, **TORCHJD_EPS)
    theirs = UPGradWeighting()(G)
    assert relative_error(ours, theirs) < 1e-9, name


@pytest.mark.parametrize(("name", "J"), cases())
def test_exact_projection_agrees_with_a_qp_solver(name, J):
    G = J @ J.T
    T = G.shape[0]
    expected = sum(reference_projection(J, row) for row in np.eye(T) / T)
    ours = upgrad_weights(G)
    assert direction_error(J, ours, torch.from_numpy(expected)) < 1e-5, name
    assert_no_conflict(G, ours)


def test_exact_and_regularized_differ_by_the_regularization():
    """On conflicting gradients the 1e-4 I term moves the weights visibly, by less than 1%."""
    J = torch.tensor([[1.0, 0.0], [-3.0, 0.5]], dtype=torch.float64)
    G = J @ J.T
    difference = relative_error(upgrad_weights(G), upgrad_weights(G, **TORCHJD_EPS))
    assert 1e-6 < difference < 1e-2


@given(jacobians())
def test_never_conflicts_with_a_task(J):
    G = J @ J.T
    assert_no_conflict(G, upgrad_weights(G))


@given(jacobians(), st.data())
def test_preferences_and_non_conflict(J, data):
    T = J.shape[0]
    pref = torch.tensor(data.draw(st.lists(st.floats(0.0, 3.0), min_size=T, max_size=T)))
    G = J @ J.T
    w = upgrad_weights(G, pref)
    assert_no_conflict(G, w)
    assert (w >= pref.double() - 1e-12).all()  # the projection only adds: v >= u
    if (G >= 0).all():  # no conflict: each scaled gradient is its own projection
        torch.testing.assert_close(w, pref.double(), rtol=1e-9, atol=1e-12)


@given(jacobians().flatmap(lambda J: st.tuples(st.just(J), permutations(J.shape[0]))))
def test_permuting_the_tasks_permutes_the_direction(case):
    J, permutation = case
    G = J @ J.T
    d = J.T @ upgrad_weights(G)
    d_permuted = J[permutation].T @ upgrad_weights(G[permutation][:, permutation])
    assert float((d - d_permuted).norm()) <= 1e-7 * float(J.norm(dim=1).max())


@given(jacobians(), st.floats(1e-4, 1e4))
def test_scaling_the_gradients_scales_the_direction(J, factor):
    """Linear under scaling (the weights do not change)."""
    G = J @ J.T
    d = J.T @ upgrad_weights(G)
    d_scaled = (factor * J).T @ upgrad_weights(factor**2 * G)
    assert float((d_scaled - factor * d).norm()) <= 1e-7 * factor * float(J.norm(dim=1).max())


def test_degenerate_cases():
    assert upgrad_weights(torch.ones(1, 1)).tolist() == [1.0]
    assert upgrad_weights(torch.zeros(3, 3)).tolist() == [1 / 3] * 3  # nothing to project
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    w = upgrad_weights(opposed)  # the dual cone is the normal plane: d = 0
    assert abs(float(w @ opposed.double() @ w)) < 1e-15


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"pref_vector": torch.ones(3)}, "one entry per task"),
        ({"pref_vector": torch.tensor([1.0, float("inf")])}, "NaN or Inf"),
        ({"reg_eps": -1.0}, "reg_eps"),
        ({"norm_eps": float("nan")}, "norm_eps"),
    ],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        upgrad_weights(torch.eye(2), **kwargs)


def test_method():
    method = UPGrad([0.2, 0.8])
    assert method.needs == Needs.GRAMIAN
    stats = TaskStats(losses=(1.0, 1.0), gramian_rows=[[1.0, -1.0], [-1.0, 4.0]])
    assert method.decide(stats).weights == upgrad_weights(stats.gramian, [0.2, 0.8]).tolist()
    with pytest.raises(ValueError, match="3 tasks"):
        method.check_num_tasks(3)
    with pytest.raises(ValueError, match="finite"):
        UPGrad([1.0, float("nan")])
    with pytest.raises(ValueError, match="reg_eps"):
        UPGrad(reg_eps=-1e-4)
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0, reg_eps=0.0)"


@pytest.mark.parametrize("num_tasks", [17, 30, 50])
def test_agrees_with_torchjd_beyond_the_gathering_size(num_tasks):
    """Past 16 tasks the T projections gather each one's passive block before the batched
    solve: still torchjd's weights with its conditioning, and no conflict without it."""
    g = torch.Generator().manual_seed(num_tasks)
    J = torch.randn(num_tasks, 200, dtype=torch.float64, generator=g)
    J *= 10.0 ** (2 * torch.rand(num_tasks, 1, dtype=torch.float64, generator=g) - 1)
    G = J @ J.T
    assert relative_error(upgrad_weights(G, **TORCHJD_EPS), UPGradWeighting()(G)) < 1e-9
    assert_no_conflict(G, upgrad_weights(G))
