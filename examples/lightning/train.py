"""Multi-task training with gradsurgery inside PyTorch Lightning.

    python examples/lightning/train.py                       # PCGrad, 20 epochs, on the CPU
    python examples/lightning/train.py --method gradnorm
    python examples/lightning/train.py --epochs 40 --resume runs/lightning/checkpoints/last.ckpt
    python examples/lightning/train.py --accelerator gpu --devices 2 --strategy ddp

Three regression tasks share a trunk; two of them pull it in opposite directions. The
LightningModule uses manual optimization: `training_step` computes one loss per task and hands
the list to the gradsurgery method in place of `self.manual_backward(loss)`. The per-task
gradients come from `gs.BatchPartitionEngine`: the three task batches go through the network
as one batch (task-major), and one backward pass is split by rows.

Checkpoints are Lightning's own. PCGrad is the optimizer that `configure_optimizers` returns,
so its state (the wrapped Adam's, the generator of the projection orders, the conflict
statistics) travels in the checkpoint's optimizer states; GradNorm's state (its weights, the
initial losses, its own Adam) goes in through `on_save_checkpoint` / `on_load_checkpoint`. A
resumed run continues exactly as the uninterrupted one (tests/test_lightning.py).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradsurgery as gs

NUM_TASKS = 3
FEATURES = 16


class MultiTaskData(Dataset):
    """Synthetic regression: item `i` holds one sample of every task.

    Tasks 0 and 1 pull the shared trunk in opposite directions, task 2 halfway along the first.
    """

    def __init__(self, size: int = 512, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(NUM_TASKS, size, FEATURES, generator=generator)
        direction = torch.linspace(-1.0, 1.0, FEATURES)
        signs = torch.tensor([1.0, -1.0, 0.5])[:, None, None]
        noise = 0.1 * torch.randn(NUM_TASKS, size, generator=generator)
        self.y = (self.x * signs * direction).sum(-1) + noise

    def __len__(self) -> int:
        return self.x.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, index], self.y[:, index]  # [T, FEATURES], [T]


class MultiTaskRegression(L.LightningModule):
    """A shared trunk and one output per task, trained with PCGrad or GradNorm."""

    def __init__(self, method: str = "pcgrad", lr: float = 1e-3, hidden: int = 64, seed: int = 0):
        super().__init__()
        if method not in ("pcgrad", "gradnorm"):
            raise ValueError(f"method must be 'pcgrad' or 'gradnorm', got {method!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # the method asks for the gradients itself
        self.net = nn.Sequential(
            nn.Linear(FEATURES, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),  # GradNorm balances the gradient norms here
            nn.ReLU(),
            nn.Linear(hidden, NUM_TASKS),  # column t is task t's prediction
        )
        # One backward pass for all tasks: hooks on the Linear layers split it by rows.
        self.engine = gs.BatchPartitionEngine(self.net)
        self.gradnorm = None
        if method == "gradnorm":
            self.gradnorm = gs.GradNorm(
                NUM_TASKS, shared_parameters=self.net[2], alpha=1.5, lr=0.01, engine=self.engine
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        adam = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if self.hparams.method == "gradnorm":
            return adam  # GradNorm sits next to the optimizer
        # PCGrad is a torch.optim.Optimizer: Lightning saves and restores its state_dict, the
        # generator of the projection orders included.
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return gs.PCGrad(adam, engine=self.engine, generator=generator)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch  # [B, T, FEATURES], [B, T]
        task_sizes = [x.shape[0]] * NUM_TASKS
        task_major = x.transpose(0, 1).reshape(-1, FEATURES)  # task 0's rows, then task 1's...
        with self.engine.record(task_sizes):
            out = self.net(task_major)
        losses = [
            F.mse_loss(rows[:, task], y[:, task]) for task, rows in enumerate(out.split(task_sizes))
        ]

        optimizer = self.optimizers()  # Lightning's wrapper of the optimizer above
        optimizer.zero_grad()
        if self.gradnorm is not None:
            info = self.gradnorm.backward(losses)  # instead of self.manual_backward(loss)
            signals = {f"weight_{t}": w for t, w in enumerate(info.weights.tolist())}
        else:
            info = optimizer.optimizer.backward(losses)  # instead of self.manual_backward(loss)
            signals = {"conflicts": float(info.num_conflicts)}
        optimizer.step()

        self.log_dict({f"loss_{t}": loss.detach() for t, loss in enumerate(losses)})
        self.log_dict(signals)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.gradnorm is not None:
            checkpoint["gradnorm"] = self.gradnorm.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.gradnorm is not None:
            self.gradnorm.load_state_dict(checkpoint["gradnorm"])


def make_trainer(epochs: int, root_dir: str, **trainer_options) -> L.Trainer:
    """A Trainer that keeps `last.ckpt` up to date after every epoch."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=f"{root_dir}/checkpoints", save_last=True, save_top_k=0
    )
    return L.Trainer(
        max_epochs=epochs,
        default_root_dir=root_dir,
        callbacks=[checkpoint],
        log_every_n_steps=10,
        **trainer_options,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=["pcgrad", "gradnorm"], default="pcgrad")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root-dir", default="runs/lightning")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="checkpoint to continue")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    model = MultiTaskRegression(method=args.method, seed=args.seed)
    data = DataLoader(MultiTaskData(seed=args.seed), batch_size=args.batch_size)
    trainer = make_trainer(
        args.epochs,
        args.root_dir,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        strategy=args.strategy,
        precision=args.precision,
    )
    trainer.fit(model, data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
