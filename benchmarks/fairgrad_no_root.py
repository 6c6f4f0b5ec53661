"""FairGrad where ``G w = w^(-1/alpha)`` has no positive root: gradsurgery against the authors.

    python benchmarks/fairgrad_no_root.py [--out benchmarks/results/fairgrad_no_root/compare.json]

For Pareto-stationary Gramians (the edge cases of ``tests/methods/_jacobians.py``, the CAGrad
toy problem's gradients next to and on its Pareto set, and random gradients with one more that
is minus a positive combination of them), normalized to a largest diagonal entry of 1, compares
``fairgrad_weights(G, alpha, rescale=False)`` with the authors' ``scipy.optimize.least_squares``
call: the objective ``0.5 ||G w - w^(-1/alpha)||^2`` relative to its value at ``w = 1/T``, the
ratio of the largest weights, and the cosine between the two updates ``w @ J``. Needs SciPy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradsurgery.functional import fairgrad_weights  # noqa: E402
from tests.methods._jacobians import cases, random_jacobian  # noqa: E402

TOY_NEAR = torch.tensor(
    [[-2.7095864798106093, -0.007785509760601045], [0.08918578776612923, 0.00025913154558060945]],
    dtype=torch.float64,
)
ALPHAS = (0.3, 0.5, 1.0, 2.0, 5.0)


def authors(A: np.ndarray, alpha: float) -> np.ndarray:
    x_start = np.ones(A.shape[0]) / A.shape[0]
    return least_squares(
        lambda x: np.dot(A, x) - np.power(1 / x, 1 / alpha), x_start, bounds=(0, np.inf)
    ).x


def jacobians() -> dict[str, torch.Tensor]:
    result = {name: J for name, J in cases() if name.startswith(("conflicting", "rank2-T8"))}
    result["toy-near-pareto"] = TOY_NEAR
    result["toy-pareto-stationary"] = torch.stack([TOY_NEAR[0], -0.0329 * TOY_NEAR[0]])
    for num_tasks in range(2, 7):
        for seed in range(4):
            J = random_jacobian(num_tasks - 1, 1000 * num_tasks + seed, 6)
            mixing = torch.rand(num_tasks - 1, generator=torch.Generator().manual_seed(seed))
            result[f"random-stationary-T{num_tasks}-{seed}"] = torch.cat(
                [J, -((mixing.double() + 0.1) @ J).unsqueeze(0)]
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "benchmarks/results/fairgrad_no_root/compare.json"
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, J in jacobians().items():
        G = J @ J.T
        scale = float(G.diagonal().max())
        J, G = J / scale**0.5, G / scale
        A = G.numpy()
        for alpha in ALPHAS:
            ours = fairgrad_weights(G, alpha, rescale=False).numpy()
            theirs = authors(A, alpha)

            def objective(w: np.ndarray, A: np.ndarray = A, alpha: float = alpha) -> float:
                r = A @ w - w ** (-1 / alpha)
                return 0.5 * float(r @ r)

            start = objective(np.full(A.shape[0], 1.0 / A.shape[0]))
            d, d_theirs = ours @ J.numpy(), theirs @ J.numpy()
            rows.append(
                {
                    "case": name,
                    "alpha": alpha,
                    "objective_ours_rel": objective(ours) / start,
                    "objective_authors_rel": objective(theirs) / start,
                    "max_weight_ours": float(ours.max()),
                    "max_weight_authors": float(theirs.max()),
                    "update_cosine": float(
                        d @ d_theirs / np.linalg.norm(d) / np.linalg.norm(d_theirs)
                    ),
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1)
    )
    for key in ("objective_ours_rel", "objective_authors_rel", "update_cosine"):
        values = [row[key] for row in rows]
        print(f"{key}: min {min(values):.3g} max {max(values):.3g}")
    ratios = [row["max_weight_ours"] / row["max_weight_authors"] for row in rows]
    print(f"max weight ours / authors: min {min(ratios):.3g} max {max(ratios):.3g}")
    for alpha in ALPHAS:
        sub = [row for row in rows if row["alpha"] == alpha]
        ours = max(r["objective_ours_rel"] for r in sub)
        theirs = max(r["objective_authors_rel"] for r in sub)
        cosine = min(r["update_cosine"] for r in sub)
        print(
            f"alpha {alpha}: objective/start max ours {ours:.2g}, authors {theirs:.2g}; "
            f"min update cosine {cosine:.6f}"
        )


if __name__ == "__main__":
    main()
