"""The shared LeNet encoder with one classifier head per digit (Sener & Koltun 2018).

The layers of ``MultiLeNetR`` / ``MultiLeNetO`` in the authors' ``models/multi_lenet.py``
(github.com/isl-org/MultiObjectiveOptimization): two 5 x 5 convolutions (10 and 20 channels,
2 x 2 max pooling, ReLU, channel dropout after the second) and a 320 -> 50 layer shared by the
tasks; each task's head is 50 -> 50 -> 10 with dropout between. Both tasks read the same image
(the shared-input setting), so one forward pass of the encoder serves both heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc = nn.Linear(320, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(50, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.dropout(F.relu(self.fc1(features)), training=self.training)
        return self.fc2(x)  # logits


class MultiLeNet(nn.Module):
    def __init__(self, num_tasks: int = 2) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.heads = nn.ModuleList(Head() for _ in range(num_tasks))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(images)
        return [head(features) for head in self.heads]


def task_losses(
    model: MultiLeNet, images: torch.Tensor, labels: torch.Tensor
) -> list[torch.Tensor]:
    """One cross-entropy per task (mean over the batch)."""
    return head_losses(model, model.encoder(images), labels)


def head_losses(
    model: MultiLeNet, features: torch.Tensor, labels: torch.Tensor
) -> list[torch.Tensor]:
    """The tasks' cross-entropies from the encoder's output ``features``."""
    return [F.cross_entropy(head(features), labels[:, k]) for k, head in enumerate(model.heads)]
