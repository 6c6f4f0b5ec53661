"""PCGrad and GradNorm on torch.distributed (gloo, CPU): the surgery of the global batch.

Each test starts its own process group in spawned processes and tears it down; a process that
hangs fails the test through the join timeout instead of blocking the suite.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gradsurgery as gs
from tests._models import MultiHead

STEPS = 4
ROWS_PER_TASK = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_batches(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    xs = torch.randn(3, ROWS_PER_TASK, 5, generator=generator, dtype=torch.float64)
    ys = torch.randn(3, ROWS_PER_TASK, generator=generator, dtype=torch.float64)
    ys[1] = -ys[1] + xs[1, :, 0]  # conflicting tasks
    return xs, ys


def local_losses(model: MultiHead, step: int, rank: int, world: int) -> list[torch.Tensor]:
    """Each process gets an equal share of every task's rows; the losses are their means."""
    xs, ys = task_batches(step)
    share = ROWS_PER_TASK // world
    rows = slice(rank * share, (rank + 1) * share)
    return [
        (model.heads[t](model.body(xs[t, rows])).squeeze(-1) - ys[t, rows]).pow(2).mean()
        for t in range(3)
    ]


def make_wrapper(method: str, model: MultiHead, rank: int):
    if method == "pcgrad":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        # Seeded differently on purpose: PCGrad gives every process rank 0's generator.
        return gs.PCGrad(optimizer, generator=torch.Generator().manual_seed(rank)), optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return gs.GradNorm(3, model.body[2], lr=0.1), optimizer


def train(method: str, rank: int, world: int, nan_at: int | None = None) -> dict:
    torch.manual_seed(0)
    model = MultiHead()
    ddp = DistributedDataParallel(model) if world > 1 else None  # as users run it
    wrapper, optimizer = make_wrapper(method, model, rank)
    errors = []
    for step in range(STEPS):
        losses = local_losses(model, step, rank, world)
        if step == nan_at and rank == world - 1:
            losses[2] = losses[2] * float("nan")
        optimizer.zero_grad()
        try:
            if method == "pcgrad":
                wrapper.pc_backward(losses)
            else:
                wrapper.backward(losses)
        except gs.NonFiniteError as error:
            errors.append((step, str(error)))
            continue
        optimizer.step()
        if world > 1:
            assert_identical_across_ranks(model, wrapper)
    del ddp
    weights = wrapper.weights if method == "gradnorm" else None
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "weights": weights,
        "errors": errors,
    }


def assert_identical_across_ranks(model, wrapper) -> None:
    state = [p.detach().flatten() for p in model.parameters()]
    if isinstance(wrapper, gs.GradNorm):
        state.append(wrapper.weights)
    flat = torch.cat(state)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other in gathered:
        assert torch.equal(other, flat), "ranks diverged"


def worker(rank: int, world: int, port: int, out: str, method: str, nan_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(method, rank, world, nan_at), Path(out) / f"rank{rank}.pt")
        gc.collect()  # DDP's reducer (hooked on the parameters) goes before the group does
        dist.barrier()  # no process tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_distributed(tmp_path: Path, method: str, nan_at: int | None = None) -> list[dict]:
    context = mp.start_processes(
        worker,
        args=(2, free_port(), str(tmp_path), method, nan_at),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    join_or_fail(context)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


# Spawning two interpreters that import torch takes tens of seconds on a loaded 2-core
# machine; a deadlock still fails the test instead of hanging the suite.
JOIN_LIMIT_S = 300.0


def join_or_fail(context: mp.ProcessContext, limit_s: float = JOIN_LIMIT_S) -> None:
    """Wait for the spawned workers; kill them and fail after ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if context.join(timeout=0.5):
            return
    for process in context.processes:
        process.kill()
    pytest.fail(f"distributed workers did not finish within {limit_s:.0f} s: deadlock?")


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_two_processes_with_half_batches_equal_one_process_with_the_whole(tmp_path, method):
    single = train(method, rank=0, world=1)
    ranks = run_distributed(tmp_path, method)
    for result in ranks:
        for a, b in zip(result["params"], single["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if method == "gradnorm":
            torch.testing.assert_close(result["weights"], single["weights"], rtol=1e-10, atol=0)
            assert not torch.allclose(single["weights"], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_a_nan_on_one_rank_makes_every_rank_refuse_the_same_step(tmp_path, method):
    ranks = run_distributed(tmp_path, method, nan_at=2)
    for result in ranks:
        assert [step for step, _ in result["errors"]] == [2]
        assert "task(s) 2" in result["errors"][0][1]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_the_torchrun_example_keeps_replicas_identical(method):
    script = Path(__file__).parents[1] / "examples" / "ddp" / "train.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        "--method",
        method,
        "--steps",
        "5",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters identical on every rank: True" in result.stdout
