"""ConFIG: against torchjd, the authors' least-squares formulation, and its defining property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation import ConFIG as TorchjdConFIG

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional._config import config_weights
from gradsurgery.methods.config import ConFIG

from ._jacobians import cases, random_jacobian
from ._pipeline import step_through_optimizer


def authors_config(J: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ConFIG_update`` of github.com/tum-pbs/ConFIG (conflictfree/grad_operator.py) with the
    default ``EqualWeight`` / ``ProjectionLength`` models and ``use_least_square=True``."""
    units = torch.nan_to_num(J / J.norm(dim=1).unsqueeze(1), 0)
    best_direction = torch.linalg.lstsq(units, weights).solution
    norm = best_direction.norm()
    unit = torch.zeros_like(best_direction) if norm == 0 else best_direction / norm
    return torch.stack([torch.dot(g, unit) for g in J]).sum() * unit


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor, J: torch.Tensor) -> float:
    """Relative to the updates' and the gradients' size: where the update is zero in exact
    arithmetic (exactly opposite gradients), the peers' rounding noise is compared with J."""
    scale = max(float(theirs.norm()), float(ours.norm()), float(J.norm()))
    return 0.0 if scale == 0 else float((ours - theirs).norm()) / scale


@pytest.mark.parametrize("preference", [False, True])
@pytest.mark.parametrize(("name", "J"), cases())
def test_agrees_with_torchjd(name, J, preference):
    pref = torch.rand(J.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pref = pref + 0.1 if preference else None
    ours = config_weights(J @ J.T, pref) @ J
    theirs = TorchjdConFIG(pref)(J)
    # The ill-conditioned cases (cond(J) = 1e4) lose digits in any pseudo-inverse.
    assert relative_difference(ours, theirs, J) < (1e-7 if name.startswith("ill") else 1e-12)


# An exactly opposite pair makes U rank-deficient with an inconsistent right-hand side: the
# authors' lstsq (LAPACK gelsy) returns zero or, from run to run, a spurious direction of the
# rounding residue. gradsurgery returns zero there, as torchjd's pinv (compared above).
AUTHORS_CASES = [(name, J) for name, J in cases() if not name.startswith("conflicting")]


@pytest.mark.parametrize(("name", "J"), AUTHORS_CASES)
def test_agrees_with_the_authors_least_squares(name, J):
    ours = config_weights(J @ J.T) @ J
    theirs = authors_config(J, torch.ones(J.shape[0], dtype=torch.float64))
    assert relative_difference(ours, theirs, J) < (1e-7 if name.startswith("ill") else 1e-12)


def test_zero_gradients_get_zero_weight():
    J = random_jacobian(4, 13)
    J[2] = 0.0
    weights = config_weights(J @ J.T)
    assert weights[2] == 0
    assert config_weights(torch.zeros(3, 3)).tolist() == [0.0, 0.0, 0.0]


def test_single_task_is_its_gradient():
    assert config_weights(torch.tensor([[4.0]])).tolist() == [1.0]


def test_exactly_opposite_gradients_give_no_update():
    g = random_jacobian(1, 3)[0]
    J = torch.stack([g, -g])
    torch.testing.assert_close(config_weights(J @ J.T) @ J, torch.zeros_like(g))


@pytest.mark.parametrize(
    ("pref", "error"),
    [
        ([1.0, -1.0], ValueError),
        ([0.0, 0.0], ValueError),
        ([1.0, float("inf")], ValueError),
        ([1.0], ValueError),
        ([[1.0, 1.0]], ValueError),
        (["a", "b"], TypeError),
    ],
)
def test_bad_preference_vectors_are_refused(pref, error):
    with pytest.raises(error, match="pref_vector"):
        config_weights(torch.eye(2), pref)


def test_bad_rcond_and_gramian_are_refused():
    with pytest.raises(ValueError, match="rcond"):
        config_weights(torch.eye(2), rcond=-1.0)
    with pytest.raises(ValueError, match="rcond"):
        ConFIG(rcond=float("nan"))
    with pytest.raises(ValueError, match="gramian"):
        config_weights(torch.tensor([[1.0, 0.0], [0.0, float("inf")]]))


jacobians = st.builds(
    random_jacobian, st.integers(1, 8), st.integers(0, 2**31 - 1), st.integers(8, 16)
)
preferences = st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8)


@given(jacobians, preferences)
def test_unit_gradients_project_as_the_preference_asks(J, pref):
    # Full row rank (T <= P, Gaussian): U x = w exactly, so u_i . d is proportional to w_i > 0:
    # no task conflicts with the update.
    pref = torch.tensor(pref[: J.shape[0]], dtype=torch.float64)
    d = config_weights(J @ J.T, pref) @ J
    projections = (J @ d) / J.norm(dim=1)
    ratio = projections / pref
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-9, atol=0)
    assert (projections > 0).all()


@given(jacobians)
def test_length_is_the_sum_of_the_projections(J):
    d = config_weights(J @ J.T) @ J
    torch.testing.assert_close(d.dot(d), (J @ d).sum(), rtol=1e-9, atol=0)


@given(jacobians, st.randoms(use_true_random=False))
def test_permuting_the_tasks_permutes_the_weights(J, rng):
    permutation = list(range(J.shape[0]))
    rng.shuffle(permutation)
    G = J @ J.T
    torch.testing.assert_close(
        config_weights(G[permutation][:, permutation]),
        config_weights(G)[permutation],
        rtol=1e-9,
        atol=1e-12,
    )


@given(jacobians, st.floats(-6, 6), st.floats(-3, 3))
def test_scaling(J, log_scale, log_task_scale):
    # Scaling every gradient by s scales the update by s: the weights do not change. Scaling
    # one gradient leaves the direction alone (only unit gradients enter it).
    s = 10.0**log_scale
    G = J @ J.T
    weights = config_weights(G)
    torch.testing.assert_close(config_weights(s * s * G), weights, rtol=1e-8, atol=0)
    scaled = J.clone()
    scaled[0] *= 10.0**log_task_scale
    direction = config_weights(scaled @ scaled.T) @ scaled
    torch.testing.assert_close(
        direction / direction.norm(), (weights @ J) / (weights @ J).norm(), rtol=1e-8, atol=1e-10
    )


def test_decide_matches_the_functional():
    J = random_jacobian(3, 5)
    G = J @ J.T
    method = ConFIG(pref_vector=[1.0, 2.0, 3.0])
    decision = method.decide(TaskStats(losses=(1.0, 2.0, 3.0), gramian_rows=G.tolist()))
    np.testing.assert_allclose(
        decision.weights, config_weights(G, [1.0, 2.0, 3.0]).numpy(), rtol=1e-13
    )
    assert decision.state is None
    assert method.needs is Needs.GRAMIAN and method.unshared == "sum"
    with pytest.raises(ValueError, match="3 entries, got 2 tasks"):
        method.decide(TaskStats(losses=(1.0, 2.0), gramian_rows=[[1.0, 0.0], [0.0, 1.0]]))
    assert repr(method) == "ConFIG(pref_vector=[1.0, 2.0, 3.0], rcond=1e-10)"


def test_through_the_optimizer():
    J, shared_grad, head_grads, expected_heads = step_through_optimizer(ConFIG())
    expected = config_weights((J @ J.T).double()).float() @ J
    torch.testing.assert_close(shared_grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grads, [tuple(g) for g in expected_heads])
