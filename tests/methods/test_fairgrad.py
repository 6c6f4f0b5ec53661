"""FairGrad: the alpha-fair weights against torchjd and the defining equation G w = w^(-1/alpha)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import least_squares
from torchjd.aggregation._fairgrad import FairGradWeighting

import gradsurgery as gs
from gradsurgery._weighting import Needs, TaskStats
from gradsurgery.functional._fairgrad import _solve_numpy, _solve_python, fairgrad_weights
from gradsurgery.methods.fairgrad import FairGrad

from ._jacobians import cases, random_jacobian
from ._pipeline import step_through_optimizer

ALPHAS = (0.5, 1.0, 2.0, 5.0)


def torchjd_weights(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """torchjd's weights, on the Gramian normalized by its largest diagonal entry.

    scipy's least_squares stops on absolute tolerances, so torchjd is accurate only for a
    Gramian of order one; the weights of ``s G`` are ``s^(-alpha / (1 + alpha))`` times those
    of ``G``, which carries torchjd's answer to any scale.
    """
    scale = float(G.diagonal().max())
    return FairGradWeighting(alpha)(G / scale) * scale ** (-alpha / (1 + alpha))


def residual(G: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    """Largest backward error of the equations ``(G w)_i = w_i^(-1/alpha)``: relative to the
    magnitudes of the terms, the rounding level of an ill-conditioned Gramian."""
    target = w ** (-1 / alpha)
    return float(((G @ w - target).abs() / (G.abs() @ w + target)).max())


def newton_step(G: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """One Newton step on ``G w - w^(-1/alpha) = 0`` from ``w``, in float64: how far ``w`` is
    from the solution, to first order, whatever the conditioning of ``G``."""
    G, w = G.double(), w.double()
    equations = G @ w - w ** (-1 / alpha)
    jacobian = G + torch.diag(w ** (-1 / alpha - 1) / alpha)
    return -torch.linalg.solve(jacobian, equations)


def test_agrees_with_torchjd():
    """Same weights wherever torchjd solved the equation; elsewhere torchjd stopped short.

    scipy's least_squares stops on its own tolerances (ftol = 1e-8), which an ill-conditioned
    Gramian turns into a visible error in the weights; ours converge to rounding level. A
    small residual is not enough to call torchjd's weights solved: with a Gramian of condition
    1e8, a residual of 1e-12 leaves the weights 1e-6 off. Newton's step from torchjd's weights
    measures how far off they are: where it is small they must match ours, and everywhere
    one step from them must land on ours.
    """
    compared, worst, worst_corrected = 0, 0.0, 0.0
    for name, J in cases(pareto_stationary=False):
        for alpha in ALPHAS:
            G = J @ J.T
            ours = fairgrad_weights(G, alpha, rescale=False)
            theirs = torchjd_weights(G, alpha)
            ours_residual, their_residual = residual(G, ours, alpha), residual(G, theirs, alpha)
            assert ours_residual < 1e-13, (name, alpha, ours_residual)
            if their_residual >= 1e-10:
                assert ours_residual < their_residual / 1e3, (name, alpha)
            if their_residual < 1e-6:  # close enough for Newton's step to be first-order
                step = newton_step(G, theirs, alpha)
                corrected = theirs.double() + step
                error = float(((ours.double() - corrected).abs() / corrected).max())
                worst_corrected = max(worst_corrected, error)
                if float((step.abs() / theirs.double()).max()) < 1e-9:
                    compared += 1
                    worst = max(worst, float(((ours - theirs).abs() / theirs).max()))
    assert worst < 1e-7
    assert worst_corrected < 1e-7  # rounding of a Gramian of condition 1e8, and second order
    assert compared >= 0.65 * len(cases(pareto_stationary=False)) * len(ALPHAS)


def test_agrees_with_torchjd_unnormalized_at_unit_scale():
    J = random_jacobian(5, 0)
    G = J @ J.T
    torch.testing.assert_close(
        fairgrad_weights(G, 2.0, rescale=False), FairGradWeighting(2.0)(G), rtol=1e-5, atol=0
    )


def test_rescale_is_the_authors_times_num_tasks():
    G = random_jacobian(4, 1) @ random_jacobian(4, 1).T
    torch.testing.assert_close(
        fairgrad_weights(G, 2.0), 4 * fairgrad_weights(G, 2.0, rescale=False), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e6])
def test_max_norm_clips_as_clip_grad_norm(max_norm):
    J = random_jacobian(3, 2)
    weights = fairgrad_weights(J @ J.T, 2.0)
    parameter = torch.zeros(J.shape[1], dtype=torch.float64, requires_grad=True)
    parameter.grad = weights @ J
    torch.nn.utils.clip_grad_norm_([parameter], max_norm)
    clipped = fairgrad_weights(J @ J.T, 2.0, max_norm=max_norm)
    torch.testing.assert_close(clipped @ J, parameter.grad, rtol=1e-12, atol=1e-15)


def test_zero_gradients_get_zero_weight_and_leave_the_others_alone():
    J = random_jacobian(4, 13)
    J[2] = 0.0
    weights = fairgrad_weights(J @ J.T, 1.0, rescale=False)
    others = [0, 1, 3]
    assert weights[2] == 0
    reduced = fairgrad_weights(J[others] @ J[others].T, 1.0, rescale=False)
    torch.testing.assert_close(weights[others], reduced, rtol=1e-12, atol=0)
    # torchjd drives the zero task's weight up without bound; the others are the same.
    torch.testing.assert_close(
        weights[others], torchjd_weights(J @ J.T, 1.0)[others], rtol=1e-5, atol=0
    )


def test_all_zero_gradients_give_zero_weights():
    assert fairgrad_weights(torch.zeros(3, 3)).tolist() == [0.0, 0.0, 0.0]


# Two gradients of the CAGrad toy problem near its Pareto set, where FairGrad stopped: a
# positive-definite Gramian whose root lies beyond float64's reach (Newton finds none).
TOY_NEAR = torch.tensor(
    [[-2.7095864798106093, -0.007785509760601045], [0.08918578776612923, 0.00025913154558060945]],
    dtype=torch.float64,
)


def no_root_jacobians() -> dict[str, torch.Tensor]:
    """Jacobians whose Gramian has no positive root that Newton's method can reach."""
    jacobians = {name: J for name, J in cases() if name in NO_ROOT_CASES}
    jacobians["toy-near-pareto"] = TOY_NEAR
    # On the Pareto set: two 2-D gradients that are negative multiples of each other.
    jacobians["toy-pareto-stationary"] = torch.stack([TOY_NEAR[0], -0.0329 * TOY_NEAR[0]])
    return jacobians


NO_ROOT_CASES = ("conflicting-pair", "conflicting-scaled-pair", "rank2-T8")


def authors_least_squares(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """The authors' solve (methods/weight_methods.py of OptMN-Lab/fairgrad), verbatim."""
    A = G.numpy()
    x_start = np.ones(A.shape[0]) / A.shape[0]

    def objfn(x):
        return np.dot(A, x) - np.power(1 / x, 1 / alpha)

    return torch.from_numpy(least_squares(objfn, x_start, bounds=(0, np.inf)).x)


def objective(G: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    return 0.5 * float(((G @ w - w ** (-1 / alpha)) ** 2).sum())


@pytest.mark.parametrize("name", ["conflicting-pair", "conflicting-scaled-pair", "rank2-T8"])
def test_pareto_stationary_gradients_raise_on_request(name):
    J = dict(cases())[name]
    with pytest.raises(ValueError, match=r"Pareto-stationary.*on_no_root='least_squares'"):
        fairgrad_weights(J @ J.T, 1.0, on_no_root="raise")
    with pytest.raises(ValueError, match="Pareto-stationary"):
        FairGrad(on_no_root="raise").decide(
            TaskStats(losses=(1.0,) * J.shape[0], gramian_rows=(J @ J.T).tolist())
        )


def test_a_bad_on_no_root_is_refused():
    with pytest.raises(ValueError, match="on_no_root must be one of"):
        fairgrad_weights(torch.eye(2), on_no_root="skip")
    with pytest.raises(ValueError, match="on_no_root must be one of"):
        FairGrad(on_no_root="skip")


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", sorted(no_root_jacobians()))
def test_without_a_root_the_weights_are_the_authors_least_squares(name, alpha):
    """No minimizer is attained there: the objective's infimum is 0, approached as the weights
    grow along the stationary combination, and every solver stops where its tests say. Ours and
    the authors' bring the objective to below 1e-4 of its value at their start, ours with
    weights at most a hundred times the authors', and the updates point the same way."""
    J = no_root_jacobians()[name]
    G = J @ J.T
    scale = float(G.diagonal().max())
    J, G = J / scale**0.5, G / scale  # the authors' tolerances are absolute: an order-one G
    ours = fairgrad_weights(G, alpha, rescale=False)
    theirs = authors_least_squares(G, alpha)
    start = objective(G, torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=G.dtype), alpha)
    assert torch.isfinite(ours).all() and (ours > 0).all()
    assert objective(G, ours, alpha) < 1e-4 * start
    assert objective(G, theirs, alpha) < 1e-4 * start
    # Never far past where the authors stop: the weights multiply float32 gradients that
    # nearly cancel.
    assert ours.max() < 1e2 * theirs.max()
    update, their_update = ours @ J, theirs @ J
    cosine = float(update @ their_update / (update.norm() * their_update.norm()))
    assert cosine > (0.75 if name == "toy-near-pareto" else 0.999), cosine


def pareto_stationary_jacobian(num_tasks: int, seed: int) -> torch.Tensor:
    """Random gradients and one more, minus a positive combination of them: no positive root."""
    J = random_jacobian(num_tasks - 1, seed, 6)
    mixing = torch.rand(num_tasks - 1, generator=torch.Generator().manual_seed(seed), dtype=J.dtype)
    return torch.cat([J, -((mixing + 0.1) @ J).unsqueeze(0)])


@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.5, 1.0, 2.0, 5.0]))
def test_pareto_stationary_gradients_get_the_authors_update_direction(num_tasks, seed, alpha):
    """Random gradients and a negative combination of them: the update points where the
    authors' does, from positive weights that lower the objective and stop no later."""
    J = pareto_stationary_jacobian(num_tasks, seed)
    G = J @ J.T
    scale = float(G.diagonal().max())
    J, G = J / scale**0.5, G / scale
    ours = fairgrad_weights(G, alpha, rescale=False)
    theirs = authors_least_squares(G, alpha)
    start = objective(G, torch.full((num_tasks,), 1.0 / num_tasks, dtype=G.dtype), alpha)
    assert torch.isfinite(ours).all() and (ours > 0).all()
    assert objective(G, ours, alpha) < 1e-2 * start
    assert ours.max() < 1e2 * theirs.max()
    update, their_update = ours @ J, theirs @ J
    assert float(update @ their_update / (update.norm() * their_update.norm())) > 0.9999


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_a_root_beyond_the_newton_budget_is_found_by_the_least_squares(num_tasks, alpha):
    """Where the root exists, it is the least-squares minimizer, unique: one Newton step cannot
    reach it, and the fallback returns it, as the authors' solver does."""
    J = random_jacobian(num_tasks, 40 + num_tasks)
    G = J @ J.T
    G = G / G.diagonal().max()
    root = fairgrad_weights(G, alpha, rescale=False)
    with pytest.raises(ValueError, match="within 1 Newton steps"):
        fairgrad_weights(G, alpha, rescale=False, max_iter=1, on_no_root="raise")
    fallback = fairgrad_weights(G, alpha, rescale=False, max_iter=1)
    torch.testing.assert_close(fallback, root, rtol=1e-6, atol=0)
    torch.testing.assert_close(authors_least_squares(G, alpha), root, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["conflicting-scaled-pair", "rank2-T8", "toy-pareto-stationary"])
def test_without_a_root_the_weights_scale_with_the_gramian(name):
    J = no_root_jacobians()[name]
    G = J @ J.T
    for s in (1e-4, 1e4):
        expected = s ** (-2 / 3) * fairgrad_weights(G, 2.0)
        torch.testing.assert_close(fairgrad_weights(s * G, 2.0), expected, rtol=1e-9, atol=0)


def test_opposite_losses_step_through_the_optimizer():
    """Exactly opposite losses: FairGrad takes a finite step, the same every time; with
    on_no_root="raise" the step is refused and changes nothing."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)

    def setup(method: FairGrad):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        optimizer = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        return model, optimizer, [loss, -3.0 * loss]

    def step(method: FairGrad) -> list[torch.Tensor]:
        model, optimizer, losses = setup(method)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.backward(losses)
        optimizer.step()
        after = [p.detach().clone() for p in model.parameters()]
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not a.equal(b) for a, b in zip(after, before, strict=True))  # it stepped
        return after

    first, second = step(FairGrad()), step(FairGrad())
    assert all(a.equal(b) for a, b in zip(first, second, strict=True))
    model, optimizer, losses = setup(FairGrad(on_no_root="raise"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Pareto-stationary"):
        optimizer.backward(losses)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.equal(b) for p, b in zip(model.parameters(), before, strict=True))


def test_alpha_zero_is_the_uniform_weighting():
    G = random_jacobian(5, 3) @ random_jacobian(5, 3).T
    assert fairgrad_weights(G, 0.0, rescale=False).tolist() == [0.2] * 5
    assert fairgrad_weights(G, 0.0).tolist() == [1.0] * 5


def test_single_task():
    # g . (w g) = w^(-1/alpha): w = ||g||^(-2 alpha / (1 + alpha))
    weights = fairgrad_weights(torch.tensor([[9.0]]), 2.0)
    torch.testing.assert_close(weights, torch.tensor([9.0 ** (-2 / 3)], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_hyper_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fairgrad_weights(torch.eye(2), **kwargs)
    with pytest.raises(ValueError, match=message):
        FairGrad(**kwargs)


@pytest.mark.parametrize(
    "gramian",
    [
        torch.ones(2, 3),
        torch.ones(3),
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        torch.tensor([[-1.0, 0.0], [0.0, 1.0]]),
    ],
)
def test_bad_gramians_are_refused(gramian):
    with pytest.raises(ValueError, match="gramian"):
        fairgrad_weights(gramian)


jacobians = st.builds(
    random_jacobian, st.integers(1, 8), st.integers(0, 2**31 - 1), st.integers(8, 16)
)
alphas = st.sampled_from([0.3, 0.5, 1.0, 2.0, 5.0])


@given(jacobians, alphas)
def test_the_weights_solve_the_fairness_equation(J, alpha):
    G = J @ J.T
    weights = fairgrad_weights(G, alpha, rescale=False)
    assert (weights > 0).all()
    assert residual(G, weights, alpha) < 1e-9


@given(jacobians, alphas, st.randoms(use_true_random=False))
def test_permuting_the_tasks_permutes_the_weights(J, alpha, rng):
    permutation = list(range(J.shape[0]))
    rng.shuffle(permutation)
    G = J @ J.T
    permuted = fairgrad_weights(G[permutation][:, permutation], alpha)
    torch.testing.assert_close(permuted, fairgrad_weights(G, alpha)[permutation], rtol=1e-9, atol=0)


@given(jacobians, alphas, st.floats(-6, 6))
def test_scaling_the_gradients(J, alpha, log_scale):
    # G -> s G gives w -> s^(-alpha / (1 + alpha)) w: the update grows as s^(1 / (2 (1 + alpha))).
    s = 10.0**log_scale
    G = J @ J.T
    torch.testing.assert_close(
        fairgrad_weights(s * G, alpha),
        s ** (-alpha / (1 + alpha)) * fairgrad_weights(G, alpha),
        rtol=1e-9,
        atol=0,
    )


def test_decide_matches_the_functional():
    J = random_jacobian(3, 5)
    G = J @ J.T
    method = FairGrad(alpha=2.0, max_norm=1.0)
    decision = method.decide(TaskStats(losses=(1.0, 2.0, 3.0), gramian_rows=G.tolist()))
    expected = fairgrad_weights(G, 2.0, max_norm=1.0)
    np.testing.assert_allclose(decision.weights, expected.numpy(), rtol=1e-12)
    assert decision.state is None
    assert method.needs is Needs.GRAMIAN and method.unshared == "sum"
    assert method.state_dict() == {}
    assert repr(method).startswith("FairGrad(alpha=2.0, rescale=True, max_norm=1.0")
    assert repr(method).endswith("on_no_root='least_squares')")


@given(st.builds(random_jacobian, st.integers(1, 6), st.integers(0, 2**31 - 1)), alphas)
def test_the_python_and_numpy_solvers_agree(J, alpha):
    gram = (J @ J.T).tolist()
    python = _solve_python(gram, alpha, 1e-8, 100)
    numpy = _solve_numpy(gram, alpha, 1e-8, 100)
    np.testing.assert_allclose(python, numpy, rtol=1e-9)


def test_through_the_optimizer():
    J, shared_grad, head_grads, expected_heads = step_through_optimizer(FairGrad(alpha=2.0))
    expected = fairgrad_weights((J @ J.T).double(), 2.0).float() @ J
    torch.testing.assert_close(shared_grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grads, [tuple(g) for g in expected_heads])
