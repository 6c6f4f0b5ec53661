"""The Gramian methods' Python-float paths (up to ``_PYTHON_MAX_SIZE`` tasks) against their NumPy
paths, on random and degenerate Gramians, and the switch-over between IMTL-G's exact inverse
and its pseudo-inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import _linalg as L
from gradsurgery._weighting import TaskStats
from gradsurgery.functional import (
    _aligned_mtl,
    _cagrad,
    _dualproj,
    _imtlg,
    _mgda,
    _nash_mtl,
    _upgrad,
)
from gradsurgery.methods.dualproj import DualProj
from gradsurgery.methods.imtlg import IMTLG
from gradsurgery.methods.mgda import MGDA
from gradsurgery.methods.upgrad import UPGrad

from ._gramian_properties import jacobians

SMALL_MODULES = (L, _aligned_mtl, _cagrad, _dualproj, _imtlg, _mgda, _upgrad)


def degenerate_jacobians() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    three = rng.standard_normal((3, 5))
    return [
        ("T=1", rng.standard_normal((1, 4))),
        ("T=2", rng.standard_normal((2, 4))),
        ("T=3", three),
        ("T=6", rng.standard_normal((6, 9)) * 10.0 ** rng.uniform(-2, 2, size=(6, 1))),
        ("rank-deficient", rng.standard_normal((3, 2))),
        ("zero gradient", np.vstack([three[:2], np.zeros((1, 5))])),
        ("all zero", np.zeros((3, 5))),
        ("opposite pair", np.vstack([three[:2], -three[:1]])),
        ("repeated", np.vstack([three[:2], 2.0 * three[:1]])),
    ]


def numpy_paths(monkeypatch):
    for module in SMALL_MODULES:
        monkeypatch.setattr(module, "_PYTHON_MAX_SIZE", 0)


SOLVERS = {
    "mgda": lambda G: _mgda.solve_mgda(G, None, "none", "raw"),
    "upgrad": lambda G: _upgrad.solve_upgrad(G, [1.0 / len(G)] * len(G), 0.0, 0.0),
    "upgrad-conditioned": lambda G: _upgrad.solve_upgrad(G, [1.0] * len(G), 1e-4, 1e-4),
    "dualproj": lambda G: _dualproj.solve_dualproj(G, [1.0 / len(G)] * len(G), 0.0, 0.0),
    "imtlg": _imtlg.solve_imtlg,
    "cagrad": lambda G: _cagrad.solve_cagrad(G, 0.4, 0),
    "cagrad-wide": lambda G: _cagrad.solve_cagrad(G, 5.0, 0),
    **{
        f"aligned-mtl-{mode}": (
            lambda G, mode=mode: _aligned_mtl.solve_aligned_mtl(
                G, [1.0 + i for i in range(len(G))], mode, _aligned_mtl._AUTHORS_RTOL
            )
        )
        for mode in _aligned_mtl.ALIGNED_MTL_SCALE_MODES
    },
}


CAGRAD_RADII = {"cagrad": 0.4, "cagrad-wide": 5.0}


def agree(G: np.ndarray, python: list[float], numpy: list[float], name: str) -> None:
    """The same update ``J^T w``, measured in the norm of ``G``, to rounding amplified by the
    condition number of ``G`` on its range (the two paths factor differently)."""
    if name in CAGRAD_RADII:
        both_cagrad_optimal(G, np.array(python), np.array(numpy), CAGRAD_RADII[name])
        return
    eigenvalues = np.linalg.eigvalsh(G)
    kept = eigenvalues[eigenvalues > len(G) * np.finfo(np.float64).eps * eigenvalues.max()]
    condition = kept.max() / kept.min() if kept.size else 1.0
    tolerance = 1e-7 + 1e3 * np.finfo(np.float64).eps * condition
    difference = np.array(python) - np.array(numpy)
    scale = max(float(np.array(numpy) @ G @ np.array(numpy)), float(G.diagonal().max()), 1e-300)
    assert float(difference @ G @ difference) <= tolerance**2 * scale, name
    # Unique weights: a full-rank G (else only J^T w is unique), and not MGDA's (whose w is
    # unique only up to the null space of G + 1 1^T).
    if condition < 1e6 and kept.size == len(G) and name != "mgda":
        np.testing.assert_allclose(python, numpy, rtol=1e-7, atol=1e-9, err_msg=name)


def both_cagrad_optimal(G: np.ndarray, python: np.ndarray, numpy: np.ndarray, c: float) -> None:
    """CAGrad's problem, max min_i g_i . d over ||d - g_0|| <= c ||g_0||, can have many
    maximizers (a zero gradient makes every d with J d >= 0 one): both updates lie in the ball
    and reach the same worst-task value."""
    mean = np.full(len(G), 1.0 / len(G))
    scale = max(float(G.diagonal().max()), 1e-300)
    for w in (python, numpy):
        offset = w - mean
        radius_squared = c * c * float(mean @ G @ mean)
        assert float(offset @ G @ offset) <= radius_squared * (1 + 1e-7) + 1e-12 * scale
    worst_python, worst_numpy = float((G @ python).min()), float((G @ numpy).min())
    assert abs(worst_python - worst_numpy) <= 1e-7 * scale


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize(("case", "J"), degenerate_jacobians())
def test_python_paths_match_numpy_on_degenerate_gramians(solver, case, J, monkeypatch):
    G = J @ J.T
    python = SOLVERS[solver](G)
    numpy_paths(monkeypatch)
    agree(G, python, SOLVERS[solver](G), f"{solver}, {case}")


@given(jacobians(min_tasks=1, max_tasks=L._PYTHON_MAX_SIZE))
def test_python_paths_match_numpy(J):
    G = (J @ J.T).numpy()
    python = {name: solve(G) for name, solve in SOLVERS.items()}
    with pytest.MonkeyPatch.context() as monkeypatch:
        numpy_paths(monkeypatch)
        for name, solve in SOLVERS.items():
            agree(G, python[name], solve(G), name)


@pytest.mark.parametrize(
    ("method", "solver"),
    [
        (MGDA(), SOLVERS["mgda"]),
        (UPGrad(), SOLVERS["upgrad"]),
        (DualProj(), SOLVERS["dualproj"]),
        (IMTLG(), SOLVERS["imtlg"]),
    ],
)
def test_decide_returns_the_solvers_weights_as_floats(method, solver):
    J = np.random.default_rng(1).standard_normal((3, 4))
    G = J @ J.T
    weights = method.decide(TaskStats(losses=(1.0,) * 3, gramian_rows=G.tolist())).weights
    assert isinstance(weights, list)
    assert all(type(value) is float for value in weights)
    assert weights == solver(G)


def with_smallest_eigenvalue(ratio: float) -> np.ndarray:
    """A 3 x 3 Gramian with eigenvalues 1, 0.5 and ``ratio`` and no zero entry."""
    rotation = np.linalg.qr(np.random.default_rng(2).standard_normal((3, 3)))[0]
    return (rotation * [1.0, 0.5, ratio]) @ rotation.T


@pytest.mark.parametrize("ratio", [1e-3, 1e-8, 1e-12, 1e-13, 1e-14, 1e-15, 1e-17, 0.0])
def test_imtlg_inverse_only_where_no_eigenvalue_is_cut(ratio):
    """The exact inverse replaces the pseudo-inverse only when the determinant proves every
    eigenvalue above the cut-off ``T eps lambda_max``: never below it."""
    G = with_smallest_eigenvalue(ratio)
    rtol = 3 * np.finfo(np.float64).eps
    inverse = _imtlg._inverse_times_norms(G.tolist(), rtol)
    eigenvalues = np.linalg.eigvalsh(G)
    if inverse is not None:
        assert eigenvalues.min() > rtol * eigenvalues.max()
    if ratio >= 1e-12:
        assert inverse is not None  # well inside: the fast path is taken
    if ratio <= 1e-15:
        assert inverse is None


@pytest.mark.parametrize("ratio", [1e-3, 1e-8, 1e-12, 1e-13, 1e-14, 1e-15, 1e-17, 0.0])
def test_imtlg_projections_are_equal_on_both_sides_of_the_switch(ratio, monkeypatch):
    """IMTL-G's defining property, G w proportional to the norms, by both paths where no
    eigenvalue is cut; and the two agree where the Gramian is well conditioned."""
    G = with_smallest_eigenvalue(ratio)
    norms = np.sqrt(G.diagonal())
    python = np.array(_imtlg.solve_imtlg(G))
    numpy_paths(monkeypatch)
    numpy = np.array(_imtlg.solve_imtlg(G))
    for w in (python, numpy):
        assert abs(w.sum() - 1.0) < 1e-12
        projections = G @ w
        # Backward stable solves: the residual is rounding times ||G|| ||w||.
        c = float(projections @ norms) / float(norms @ norms)
        residual = np.abs(projections - c * norms).max()
        if ratio > 3 * np.finfo(np.float64).eps:  # no eigenvalue cut: G w = c n exactly
            assert residual <= 1e-9 * max(1.0, np.abs(w).max())
    if ratio >= 1e-8:
        np.testing.assert_allclose(python, numpy, rtol=1e-6)


@given(st.integers(1, L._PYTHON_MAX_SIZE), st.integers(0, 2**31 - 1))
def test_small_eigh_is_an_eigendecomposition(num_tasks, seed):
    J = np.random.default_rng(seed).standard_normal((num_tasks, num_tasks + 1))
    G = J @ J.T
    values, vectors = L.eigh(G)
    assert (np.diff(values) >= 0).all()
    np.testing.assert_allclose((vectors * values) @ vectors.T, G, atol=1e-12 * np.abs(G).max())
    torch.testing.assert_close(
        torch.from_numpy(values), torch.linalg.eigvalsh(torch.from_numpy(G)), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(("case", "J"), degenerate_jacobians())
@pytest.mark.parametrize("warm", [False, True])
def test_nash_mtl_python_path_matches_numpy(case, J, warm, monkeypatch):
    """The same Newton steps on Python floats: the same weights and iteration count, and the
    same refusal where no bargaining solution exists (an opposite pair)."""
    G = J @ J.T
    start = np.full(len(G), 0.5) if warm else None

    def solve():
        try:
            return _nash_mtl.solve_bargaining(G, 20, start)
        except _nash_mtl.NashMTLNoSolutionError:
            return None

    python = solve()
    monkeypatch.setattr(_nash_mtl, "_PYTHON_MAX_SIZE", 0)
    numpy = solve()
    if numpy is None:
        assert python is None, case
        return
    assert python.converged == numpy.converged
    assert python.iterations == numpy.iterations
    np.testing.assert_allclose(python.weights, numpy.weights, rtol=1e-9, err_msg=case)


@pytest.mark.parametrize(("case", "J"), degenerate_jacobians())
def test_cagrad_faces_by_elimination_match_least_squares(case, J, monkeypatch):
    """CAGrad's affine minimizer on a face, w(s) = p + s q: the elimination through G_S's
    factorization gives least squares' answer, and declines (None) where G_S is singular."""
    G = J @ J.T
    scale = float(G.diagonal().max())
    if scale == 0:
        return
    G = G / scale
    mean = np.full(len(G), 1.0 / len(G))
    mean_gram = G @ mean
    hull = _cagrad._ShiftedHull(G, mean_gram, float(mean @ mean_gram), 0.4)
    for size in range(1, len(G) + 1):
        support = np.arange(size)
        by_elimination = hull._affine_by_elimination(support)
        if np.linalg.matrix_rank(G[:size, :size], tol=1e-10) < size:
            assert by_elimination is None, case
            continue
        with monkeypatch.context() as patch:
            patch.setattr(_cagrad, "_PYTHON_MAX_SIZE", 0)
            by_least_squares = hull._affine_on(support)
        assert by_elimination is not None, case
        for ours, theirs in zip(by_elimination, by_least_squares, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-10, err_msg=case)


@pytest.mark.parametrize("size", [1, 3, L._PYTHON_MAX_SIZE, L._PYTHON_MAX_SIZE + 1])
@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ("nan", ValueError, "NaN or Inf"),
        ("inf", ValueError, "NaN or Inf"),
        ("negative diagonal", ValueError, "negative diagonal"),
        ("not square", ValueError, "square"),
        ("integer", TypeError, "float dtype"),
    ],
)
def test_tensor_gramians_are_checked_on_both_paths(size, edit, error, message):
    G = torch.eye(size, dtype=torch.float32)
    if edit == "nan":
        G[0, -1] = float("nan")
    elif edit == "inf":
        G[-1, 0] = float("inf")
    elif edit == "negative diagonal":
        G[-1, -1] = -1.0
    elif edit == "not square":
        G = torch.ones(size, size + 1)
    else:
        G = G.long()
    with pytest.raises(error, match=message):
        L.as_gramian(G)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 3, L._PYTHON_MAX_SIZE + 1])
def test_tensor_gramians_become_the_same_float64_array_on_both_paths(dtype, size):
    J = torch.randn(size, 5, generator=torch.Generator().manual_seed(size))
    G = (J @ J.T).to(dtype).requires_grad_(dtype != torch.float16)
    array = L.as_gramian(G)
    assert array.dtype == np.float64
    np.testing.assert_array_equal(array, G.detach().double().numpy())
