"""The small solvers of gradsurgery._linalg against scipy's NNLS, and their two code paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import nnls

from gradsurgery import _linalg as L


@st.composite
def least_squares(draw):
    """``A`` [m, n] with n <= 10 (rank-deficient, zero and repeated columns included), ``b``."""
    n = draw(st.integers(1, 10))
    m = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    A = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-2, 2, size=(1, n))
    edit = draw(st.sampled_from(["none", "zero", "repeat"]))
    if edit == "zero":
        A[:, -1] = 0.0
    elif edit == "repeat" and n > 1:
        A[:, -1] = A[:, 0]
    return A, rng.standard_normal(m)


def gram_form(A, b):
    scale = max(float((A * A).sum(axis=0).max()), 1e-300)
    return A.T @ A / scale, A.T @ b / scale


@given(least_squares())
def test_nnls_gram_reaches_scipys_residual(problem):
    """Same minimum of ||A z - b|| as scipy's NNLS (Lawson-Hanson on A itself)."""
    A, b = problem
    M, c = gram_form(A, b)
    z = L.nnls_gram(M, c)
    assert (z >= 0).all()
    ours = float(np.linalg.norm(A @ z - b))
    theirs = float(np.linalg.norm(A @ nnls(A, b, maxiter=1000)[0] - b))
    assert ours <= theirs + 1e-9 * max(1.0, float(np.linalg.norm(b)))


@given(least_squares().filter(lambda p: p[0].shape[1] <= L._PYTHON_MAX_SIZE))
def test_python_and_numpy_paths_agree(problem):
    A, b = problem
    M, c = gram_form(A, b)
    python = L.nnls_gram(M, c)
    size = L._PYTHON_MAX_SIZE
    try:
        L._PYTHON_MAX_SIZE = 0
        numpy = L.nnls_gram(M, c)
    finally:
        L._PYTHON_MAX_SIZE = size

    def objective(z):
        return float(z @ M @ z - 2 * c @ z)

    assert abs(objective(python) - objective(numpy)) <= 1e-12 * max(1.0, abs(objective(numpy)))


def test_solver_error_when_the_iterations_run_out():
    M = np.array([[1.0, 0.5], [0.5, 1.0]])
    with pytest.raises(L.SolverError, match="did not converge"):
        L.nnls_gram(M, np.array([1.0, 1.0]), max_iter=1)


@pytest.mark.parametrize(
    ("gramian", "error"),
    [
        (np.ones((2, 3)), ValueError),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError),
        (np.array([[-1.0]]), ValueError),
        (np.eye(2, dtype=int), TypeError),
        ([[1.0]], TypeError),
    ],
)
def test_as_gramian_refuses_what_is_not_a_gramian(gramian, error):
    with pytest.raises(error):
        L.as_gramian(gramian)


@given(least_squares(), st.data())
def test_any_initial_guess_reaches_the_same_minimum(problem, data):
    A, b = problem
    M, c = gram_form(A, b)
    n = M.shape[0]
    guess = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    warm, cold = L.nnls_gram(M, c, initial=guess), L.nnls_gram(M, c)

    def objective(z):
        return float(z @ M @ z - 2 * c @ z)

    assert (warm >= 0).all()
    assert abs(objective(warm) - objective(cold)) <= 1e-12 * max(1.0, abs(objective(cold)))


@given(least_squares(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_rows_in_lockstep_match_one_by_one(problem, num_rows, seed):
    A, _ = problem
    scale = max(float((A * A).sum(axis=0).max()), 1e-300)
    M = A.T @ A / scale
    B = np.random.default_rng(seed).standard_normal((num_rows, A.shape[0]))
    C = B @ A / scale  # targets in the range of M: every problem has a minimizer
    Z = L.nnls_gram_rows(M, C)
    for z, c in zip(Z, C, strict=True):
        alone = L.nnls_gram(M, c)

        def objective(x, c=c):
            return float(x @ M @ x - 2 * c @ x)

        assert (z >= 0).all()
        assert abs(objective(z) - objective(alone)) <= 1e-12 * max(1.0, abs(objective(alone)))


def assert_same_minimum(M, c, z, expected):
    def objective(x):
        return float(x @ M @ x - 2 * c @ x)

    assert (z >= 0).all()
    assert abs(objective(z) - objective(expected)) <= 1e-12 * max(1.0, abs(objective(expected)))


@given(least_squares().filter(lambda p: p[0].shape[1] <= L._PYTHON_MAX_SIZE))
def test_exchange_method_reaches_lawson_hansons_minimum(problem):
    """The small problems' exchange method, when it finishes, against Lawson-Hanson alone."""
    A, b = problem
    M, c = gram_form(A, b)
    tolerance, singular = L._tolerances(len(c), max(np.abs(M).max(), np.abs(c).max()))
    exchange = L._nnls_gram_exchange(M.tolist(), c.tolist(), tolerance, singular)
    reference = L.nnls_gram(M, c, max_iter=3 * len(c))
    if exchange is not None:
        assert_same_minimum(M, c, np.array(exchange), reference)
    assert_same_minimum(M, c, L.nnls_gram(M, c), reference)  # or Lawson-Hanson after it


@given(least_squares(), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_rows_exchange_matches_lawson_hanson_in_lockstep(problem, num_rows, seed):
    A, _ = problem
    scale = max(float((A * A).sum(axis=0).max()), 1e-300)
    M = A.T @ A / scale
    C = np.random.default_rng(seed).standard_normal((num_rows, A.shape[0])) @ A / scale
    tolerance, singular = L._tolerances(M.shape[0], max(np.abs(M).max(), np.abs(C).max()))
    exchange = L._nnls_gram_rows_exchange(M, C, tolerance, singular)
    reference = L._nnls_gram_rows_lawson_hanson(M, C, tolerance)
    for z, expected, c in zip(
        L.nnls_gram_rows(M, C) if exchange is None else exchange, reference, C, strict=True
    ):
        assert_same_minimum(M, c, z, expected)


def test_exchange_gives_way_to_lawson_hanson_on_a_singular_block():
    """Two equal columns both enter at once: their block is singular, so the exchange method
    declines and Lawson-Hanson (which keeps the passive columns independent) answers."""
    A = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    b = np.array([1.0, -1.0])
    M, c = gram_form(A, b)
    tolerance, singular = L._tolerances(3, 1.0)
    assert L._nnls_gram_exchange(M.tolist(), c.tolist(), tolerance, singular) is None
    assert L._nnls_gram_rows_exchange(M, c[None], tolerance, singular) is None
    z = L.nnls_gram(M, c)
    np.testing.assert_allclose(A @ z, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(A @ L.nnls_gram_rows(M, np.stack([c, c]))[1], [1.0, 0.0], atol=1e-12)


def test_exchange_needs_fewer_solves_than_one_column_at_a_time():
    """Every conflicting coordinate enters in the first round: one solve for a full support."""
    M = np.array([[1.0, 0.2, 0.1], [0.2, 1.0, 0.3], [0.1, 0.3, 1.0]])
    c = np.array([1.0, 1.0, 1.0])
    solves = []
    original = L.solve_psd_block

    def counting(*args):
        solves.append(args[1])
        return original(*args)

    L.solve_psd_block = counting
    try:
        z = L.nnls_gram(M, c)
    finally:
        L.solve_psd_block = original
    np.testing.assert_allclose(z, np.linalg.solve(M, c), rtol=1e-14)
    assert solves == [[0, 1, 2]]


@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_psd_block_solve_matches_numpy(size, seed, singular):
    """Every size of the block solve (the unrolled ones up to three included), on a block in
    the middle of a larger matrix; None on a singular block."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((size + 2, size + 2 + (0 if singular else 3)))
    if singular:
        A[2] = A[1]  # two equal rows: their Gram block is singular
    M = A @ A.T / float((A * A).sum(axis=1).max())
    indices = list(range(1, size + 1))
    rhs = rng.standard_normal(size + 2)
    _, threshold = L._tolerances(size, 1.0)
    solution = L.solve_psd_block(M.tolist(), indices, rhs.tolist(), threshold)
    block = M[np.ix_(indices, indices)]
    if singular and size >= 2:
        assert solution is None
        return
    assert solution is not None
    np.testing.assert_allclose(
        block @ np.array(solution), rhs[indices], atol=1e-10 * np.abs(rhs).max()
    )


@given(st.integers(L._GATHER_MIN_SIZE + 1, 30), st.integers(0, 2**31 - 1))
def test_gathered_passive_blocks_solve_as_padded_ones(n, seed):
    """Beyond _GATHER_MIN_SIZE each row's passive block is gathered before the batched
    Cholesky: the same solutions as the blocks padded to full size."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 5))
    M = A @ A.T / float((A * A).sum(axis=1).max())
    C = rng.standard_normal((4, n))
    passive = rng.random((4, n)) < rng.uniform(0.1, 0.9)
    passive[0] = False  # a row with nothing passive
    gathered = L._cholesky_solve_rows(M, C, passive, 0.0)
    size = L._GATHER_MIN_SIZE
    try:
        L._GATHER_MIN_SIZE = n
        padded = L._cholesky_solve_rows(M, C, passive, 0.0)
    finally:
        L._GATHER_MIN_SIZE = size
    assert gathered is not None and padded is not None
    np.testing.assert_allclose(gathered, padded, rtol=1e-9, atol=1e-12)
    assert (gathered[~passive] == 0).all()


@given(st.integers(L._GATHER_MIN_SIZE + 1, 30), st.integers(0, 2**31 - 1))
def test_many_rows_of_many_variables_match_one_by_one(n, seed):
    """The lockstep exchange method where its blocks are gathered (UPGrad at T > 16)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n + 3, n)) * 10.0 ** rng.uniform(-1, 1, size=(1, n))
    scale = float((A * A).sum(axis=0).max())
    M = A.T @ A / scale
    C = -(np.eye(n)[: min(n, 8)] @ M)  # UPGrad's targets: -G u for u = e_i
    for z, c in zip(L.nnls_gram_rows(M, C), C, strict=True):
        assert_same_minimum(M, c, z, L.nnls_gram(M, c))


@given(st.integers(L._GATHER_MIN_SIZE + 1, 30), st.integers(0, 2**31 - 1))
def test_one_projection_of_many_variables_matches_lawson_hanson(n, seed):
    """DualProj's single projection beyond _GATHER_MIN_SIZE tasks runs the batched exchange."""
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((n, n + 3)) * 10.0 ** rng.uniform(-1, 1, size=(n, 1))
    G = J @ J.T
    u = np.full(n, 1.0 / n)
    v = L.project_dual_cone(G, u)
    M = G / float(G.diagonal().max())
    assert_same_minimum(M, -(M @ u), v - u, L.nnls_gram(M, -(M @ u), max_iter=3 * n))
