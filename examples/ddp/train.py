"""Multi-task training with PCGrad or GradNorm under DistributedDataParallel.

Launch with torchrun (CPU and gloo; with one GPU per process the same script picks nccl):

    torchrun --nproc_per_node=2 examples/ddp/train.py --method pcgrad
    torchrun --nproc_per_node=2 examples/ddp/train.py --method gradnorm

Every process draws its own share of every task's batch. gradsurgery averages the per-task
gradients over the processes (one all-reduce per step) before the surgery, so each process
applies the PCGrad/GradNorm update of the global batch and the replicas stay identical.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradsurgery as gs

NUM_TASKS = 3


class MultiTaskRegressor(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, features: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(NUM_TASKS))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](torch.relu(self.trunk(x))).squeeze(-1)


def task_batch(task: int, step: int, rank: int, batch_size: int, device: torch.device):
    """Synthetic regression data; tasks 0 and 1 pull the trunk in opposite directions."""
    generator = torch.Generator().manual_seed(1_000 * step + 10 * task + rank)
    x = torch.randn(batch_size, 16, generator=generator)
    direction = torch.linspace(-1, 1, 16) * (1 if task == 0 else -1 if task == 1 else 0.5)
    y = x @ direction + 0.1 * torch.randn(batch_size, generator=generator)
    return x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["pcgrad", "gradnorm"], default="pcgrad")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="per task and process")
    args = parser.parse_args()

    # One GPU per process (nccl) when this machine has enough of them, else the CPU (gloo).
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    torch.set_num_threads(1)
    train(args, device)
    # DDP's reducer lives on through hooks on the parameters: free everything of the run while
    # the process group still exists, or its destruction at interpreter exit can abort.
    gc.collect()
    dist.barrier()  # no process tears the group down while another still talks to it
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical initial replicas (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(MultiTaskRegressor().to(device))
    net = model.module
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if args.method == "pcgrad":
        optimizer = gs.PCGrad(optimizer, generator=torch.Generator().manual_seed(0))
    else:
        gradnorm = gs.GradNorm(NUM_TASKS, net.trunk[2], alpha=1.5, lr=0.01)

    for step in range(args.steps):
        losses = []
        for task in range(NUM_TASKS):
            x, y = task_batch(task, step, rank, args.batch_size, device)
            losses.append(nn.functional.mse_loss(model(x, task), y))
        optimizer.zero_grad()
        if args.method == "pcgrad":
            info = optimizer.pc_backward(losses)  # one all-reduce of the per-task gradients
            signal = f"conflicts {info.num_conflicts}"
        else:
            info = gradnorm.backward(losses)
            signal = "weights " + " ".join(f"{w:.3f}" for w in info.weights.tolist())
        optimizer.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            shown = " ".join(f"{loss.item():.4f}" for loss in losses)
            print(f"step {step:4d}  losses (rank 0) {shown}  {signal}", flush=True)

    # The replicas never diverge: every process applied the same update.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(replicas, flat)
    if rank == 0:
        same = all(torch.equal(r, flat) for r in replicas)
        print(f"{world} processes, parameters identical on every rank: {same}")


if __name__ == "__main__":
    main()
