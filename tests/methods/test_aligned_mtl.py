"""Aligned-MTL: the balance transformation against torchjd and the authors' (LibMTL) code, and
the defining property: the aligned gradients are orthogonal with equal norms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchjd.aggregation._aligned_mtl import AlignedMTLWeighting

from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional import aligned_mtl_weights
from gradsurgery.methods.aligned_mtl import AlignedMTL

from ._gramian_properties import jacobians, permutations, relative_error
from ._jacobians import cases

FLOAT64_EPS = float(torch.finfo(torch.float64).eps)


def authors_weights(G: torch.Tensor) -> torch.Tensor:
    """LibMTL's Aligned_MTL (modified from the authors' SamsungLabs/MTL code), in float64."""
    lmbda, V = torch.linalg.eigh(G)
    tol = torch.max(lmbda) * max(G.shape[-2:]) * torch.finfo(torch.float32).eps
    rank = sum(lmbda > tol)
    order = torch.argsort(lmbda, dim=-1, descending=True)
    lmbda, V = lmbda[order][:rank], V[:, order][:, :rank]
    sigma = torch.diag(1 / lmbda.sqrt())
    B = lmbda[-1].sqrt() * ((V @ sigma) @ V.t())
    return B.sum(0)


def balance(G: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """B with w = B p: column i holds the weights of the i-th aligned gradient."""
    T = G.shape[0]
    return torch.stack(
        [
            aligned_mtl_weights(
                G, torch.eye(T, dtype=torch.float64)[i], scale_mode=scale_mode, rtol=FLOAT64_EPS
            )
            for i in range(T)
        ],
        dim=1,
    )


@pytest.mark.parametrize(("name", "J"), [c for c in cases() if c[0] != "all-zero"])
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_agrees_with_torchjd(name, J, scale_mode):
    """torchjd weights the balanced gradients by the mean and cuts eigenvalues at its dtype's
    eps; the same options here give its weights."""
    G = J @ J.T
    T = G.shape[0]
    theirs = AlignedMTLWeighting(scale_mode=scale_mode)(G)
    ours = aligned_mtl_weights(
        G, torch.full((T,), 1.0 / T), scale_mode=scale_mode, rtol=FLOAT64_EPS
    )
    assert relative_error(ours, theirs) < 1e-7, name


@pytest.mark.parametrize(("name", "J"), [c for c in cases() if c[0] != "all-zero"])
def test_agrees_with_the_authors(name, J):
    G = J @ J.T
    assert relative_error(aligned_mtl_weights(G), authors_weights(G)) < 1e-7, name


@given(jacobians(full_rank=True, spread=1.0), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_are_orthogonal_with_equal_norms(J, scale_mode):
    """J^T B: its Gramian B^T G B is s I, s the chosen eigenvalue of G."""
    G = J @ J.T
    B = balance(G, scale_mode)
    aligned = B.T @ G @ B
    eigenvalues = torch.linalg.eigvalsh(G)
    s = {
        "min": eigenvalues.min(),
        "median": eigenvalues.sort().values[(len(eigenvalues) - 1) // 2],
        "rmse": eigenvalues.mean(),
    }[scale_mode]
    expected = s * torch.eye(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(aligned, expected, rtol=0, atol=1e-7 * float(s))


@given(
    jacobians(full_rank=True, spread=1.0).flatmap(
        lambda J: st.tuples(st.just(J), permutations(J.shape[0]))
    )
)
def test_permuting_the_tasks_permutes_the_weights(case):
    J, permutation = case
    G = J @ J.T
    permuted = aligned_mtl_weights(G[permutation][:, permutation])
    torch.testing.assert_close(permuted, aligned_mtl_weights(G)[permutation], rtol=1e-6, atol=1e-9)


@given(jacobians(spread=1.0), st.floats(1e-4, 1e4))
def test_weights_do_not_change_with_scale(J, factor):
    G = J @ J.T
    torch.testing.assert_close(
        aligned_mtl_weights(factor**2 * G), aligned_mtl_weights(G), rtol=1e-6, atol=1e-9
    )


def test_degenerate_cases():
    assert aligned_mtl_weights(torch.ones(1, 1)).tolist() == [1.0]
    assert aligned_mtl_weights(torch.zeros(2, 2)).tolist() == [1.0, 1.0]  # documented: p
    # Identical gradients g: rank one, B = 1 1^T / 2, each aligned gradient is g itself.
    w = aligned_mtl_weights(torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"scale_mode": "mean"}, "scale_mode"),
        ({"rtol": -1.0}, "rtol"),
        ({"pref_vector": [1.0]}, "one entry per task"),
    ],
)
def test_bad_options_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        aligned_mtl_weights(torch.eye(2), **kwargs)


def test_method():
    method = AlignedMTL(scale_mode="rmse")
    assert method.needs == Needs.GRAMIAN
    stats = TaskStats(losses=(1.0, 2.0), gramian_rows=[[1.0, 0.3], [0.3, 4.0]])
    expected = aligned_mtl_weights(stats.gramian, scale_mode="rmse").tolist()
    assert method.decide(stats).weights == expected
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="3 tasks"):
        AlignedMTL([1.0, 2.0]).check_num_tasks(3)
