"""Small multi-task models shared by the tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Every device this machine has. CI has only the CPU; on a GPU machine, the tests that take a
# ``device`` parameter also run on CUDA.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


class MultiHead(nn.Module):
    """A shared body, one linear head per task, and a parameter that no task uses."""

    def __init__(self, num_tasks: int = 3, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_tasks))
        self.unused = nn.Linear(2, 2)
        self.to(dtype)

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        features = self.body(x)
        return [
            (head(features).squeeze(-1) - y[:, i]).pow(2).mean()
            for i, head in enumerate(self.heads)
        ]


def batch(
    num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64, device: str = "cpu"
):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=generator, dtype=dtype)
    # Opposite targets make the tasks' gradients on the body conflict.
    signs = torch.tensor([(-1.0) ** i for i in range(num_tasks)], dtype=dtype)
    y = (x[:, :1] * signs) + 0.1 * torch.randn(32, num_tasks, generator=generator, dtype=dtype)
    return x.to(device), y.to(device)


def model_and_batch(
    num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64, device: str = "cpu"
):
    """The same model and batch on every device (drawn on the CPU, then moved)."""
    torch.manual_seed(seed)
    return MultiHead(num_tasks, dtype).to(device), *batch(num_tasks, seed, dtype, device)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Everything a failed call must leave untouched."""
    state = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
    }
    if optimizer is not None:
        state["optimizer"] = repr(optimizer.state_dict())
    return state


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
        ga, gb = a["grads"][name], b["grads"][name]
        assert (ga is None and gb is None) or torch.equal(ga, gb), name
    assert a.get("optimizer") == b.get("optimizer")
