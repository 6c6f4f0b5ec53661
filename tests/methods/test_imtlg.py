"""IMTL-G: equal projections, against torchjd and LibMTL's closed form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation._imtl_g import IMTLGWeighting

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import imtlg_weights
from gradsurgery.methods.imtlg import IMTLG

from ._gramian_properties import direction_error, jacobians, permutations, relative_error
from ._jacobians import cases

# IMTL-G solves a linear system in G: its accuracy is cond(G) * eps, so the property tests
# keep the rows' scales within a factor 100 of each other.


def libmtl_weights(J: torch.Tensor) -> torch.Tensor:
    """LibMTL's IMTL-G: alpha solves (g_1 - g_i) . (u_1 - u_j) systems for full-rank J."""
    units = J / J.norm(dim=1, keepdim=True)
    D = J[0:1] - J[1:]
    U = units[0:1] - units[1:]
    alpha = (J[0] @ U.T) @ torch.linalg.inv(D @ U.T)
    return torch.cat([(1 - alpha.sum()).unsqueeze(0), alpha])


@pytest.mark.parametrize(("name", "J"), cases())
def test_agrees_with_torchjd(name, J):
    """Both use G^+ n; torchjd on the raw Gramian, ours at unit scale: the same direction."""
    G = J @ J.T
    ours, theirs = imtlg_weights(G), IMTLGWeighting()(G)
    if float(theirs.abs().sum()) == 0:
        assert float(ours.abs().sum()) == 0 or direction_error(J, ours, theirs) < 1e-8, name
    else:
        assert direction_error(J, ours, theirs) < 1e-6 * float(theirs.abs().max()), name


@pytest.mark.parametrize(("name", "J"), [case for case in cases() if "random" in case[0]])
def test_agrees_with_libmtl_on_full_rank_gradients(name, J):
    G = J @ J.T
    assert relative_error(imtlg_weights(G), libmtl_weights(J)) < 1e-9, name


@given(jacobians(full_rank=True, spread=1.0))
def test_equal_projections_on_the_unit_gradients(J):
    G = J @ J.T
    w = imtlg_weights(G)
    projections = (G @ w) / G.diagonal().sqrt()
    assert abs(float(w.sum()) - 1) < 1e-9
    spread = float(projections.max() - projections.min())
    assert spread <= 1e-6 * float(projections.abs().max())


@given(
    jacobians(full_rank=True, spread=1.0).flatmap(
        lambda J: st.tuples(st.just(J), permutations(J.shape[0]))
    )
)
def test_permuting_the_tasks_permutes_the_weights(case):
    J, permutation = case
    G = J @ J.T
    permuted = imtlg_weights(G[permutation][:, permutation])
    torch.testing.assert_close(permuted, imtlg_weights(G)[permutation], rtol=1e-6, atol=1e-9)


@given(jacobians(full_rank=True, spread=1.0), st.floats(1e-4, 1e4))
def test_weights_do_not_change_with_scale(J, factor):
    G = J @ J.T
    torch.testing.assert_close(imtlg_weights(factor**2 * G), imtlg_weights(G), rtol=1e-6, atol=1e-9)


def test_degenerate_cases():
    assert imtlg_weights(torch.ones(1, 1)).tolist() == [1.0]
    assert imtlg_weights(torch.zeros(2, 2)).tolist() == [0.0, 0.0]  # documented: no update
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert imtlg_weights(opposed).tolist() == [0.0, 0.0]  # no equal positive projection
    identical = imtlg_weights(torch.ones(2, 2))  # the same direction: half each
    torch.testing.assert_close(identical, torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        imtlg_weights(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))


def test_method():
    method = IMTLG()
    assert method.needs == Needs.GRAMIAN
    stats = TaskStats(losses=(1.0, 2.0), gramian_rows=[[1.0, 0.2], [0.2, 4.0]])
    assert method.decide(stats).weights == imtlg_weights(stats.gramian).tolist()
    assert repr(method) == "IMTLG()"
