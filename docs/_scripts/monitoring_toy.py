"""The toy run behind the figure of the "Monitoring" guide page.

Three regression tasks share a small trunk and have one head each. Task 2's targets are
ten times larger than the others', and tasks 0 and 1 want partly opposite features. The same
network is trained twice from the same initialisation, once with PCGrad and once with
GradNorm, and the figure shows what the two report at each step. Sphinx's plot directive
runs this file when the documentation is built, so the figure shows the current library.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

import gradsurgery as gs

STEPS = 400
BATCH = 64
TASKS = ("task 0", "task 1", "task 2 (x10)")


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 8, generator=g)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    u, v = x @ a, x @ b
    targets = [torch.sin(u / 2), torch.sin((v - u) / 2), 10 * torch.tanh(v)]
    return x, torch.stack(targets, dim=1)


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
    )
    heads = torch.nn.ModuleList(torch.nn.Linear(32, 1) for _ in TASKS)
    return trunk, heads


def train(method: str) -> dict[str, list]:
    x, targets = make_data()
    trunk, heads = make_model()
    params = [*trunk.parameters(), *heads.parameters()]
    batches = torch.Generator().manual_seed(1)
    log: dict[str, list] = {key: [] for key in ("cosine", "rate", "weights", "ratios")}
    if method == "pcgrad":
        orders = torch.Generator().manual_seed(0)
        optimizer = gs.PCGrad(torch.optim.Adam(params, lr=3e-3), generator=orders)
    else:
        optimizer = torch.optim.Adam(params, lr=3e-3)
        gradnorm = gs.GradNorm(len(TASKS), trunk[2], alpha=1.5, lr=0.02)
    for _ in range(STEPS):
        rows = torch.randint(0, x.shape[0], (BATCH,), generator=batches)
        features = trunk(x[rows])
        losses = [
            torch.nn.functional.mse_loss(head(features).squeeze(1), targets[rows, i])
            for i, head in enumerate(heads)
        ]
        optimizer.zero_grad()
        if method == "pcgrad":
            info = optimizer.pc_backward(losses)
            cosine = info.cosine
            log["cosine"].append([float(cosine[i, j]) for i, j in ((0, 1), (0, 2), (1, 2))])
            log["rate"].append(info.conflict_rate)
        else:
            info = gradnorm.backward(losses)
            log["weights"].append(info.weights.tolist())
            log["ratios"].append(info.loss_ratios.tolist())
        optimizer.step()
    return log


def moving_average(values: torch.Tensor, window: int = 25) -> torch.Tensor:
    kernel = torch.ones(window) / window
    padded = torch.cat([values[:1].expand(window - 1), values])
    return torch.nn.functional.conv1d(padded[None, None], kernel[None, None])[0, 0]


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and noise)
    pcgrad, gradnorm = train("pcgrad"), train("gradnorm")
    steps = torch.arange(STEPS)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.2), sharex=True)

    cosine = torch.tensor(pcgrad["cosine"])
    for k, label in enumerate(("tasks 0, 1", "tasks 0, 2", "tasks 1, 2")):
        axes[0, 0].plot(steps, cosine[:, k], lw=0.6, alpha=0.35, color=f"C{k}")
        smooth = moving_average(cosine[:, k])
        axes[0, 0].plot(steps, smooth, lw=1.8, color=f"C{k}", label=label)
    axes[0, 0].axhline(0, color="0.5", lw=0.8)
    axes[0, 0].set_title("PCGrad: info.cosine (pairs)")
    axes[0, 0].legend(loc="lower right", fontsize=8)

    rate = torch.tensor(pcgrad["rate"])
    axes[0, 1].plot(steps, moving_average(rate), color="C3")
    axes[0, 1].set_ylim(0, 1)
    axes[0, 1].set_title("PCGrad: info.conflict_rate (25-step mean)")

    weights = torch.tensor(gradnorm["weights"])
    ratios = torch.tensor(gradnorm["ratios"])
    # What the guide's text says about this figure: the build fails if it stops being true.
    assert int(ratios[-50:].mean(0).argmin()) == 2 and int(weights[-1].argmin()) == 2
    assert abs(float(weights[-1].sum()) - len(TASKS)) < 1e-6
    for i, label in enumerate(TASKS):
        axes[1, 0].plot(steps, weights[:, i], color=f"C{i}", label=label)
        axes[1, 1].plot(steps, ratios[:, i], color=f"C{i}", label=label)
    axes[1, 0].set_title("GradNorm: info.weights")
    axes[1, 0].legend(fontsize=8)
    axes[1, 1].set_title("GradNorm: info.loss_ratios  $L_i(t) / L_i(0)$")
    axes[1, 1].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()


main()
