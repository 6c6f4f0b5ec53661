"""Per-task convolution weight gradients: three ways, against the plain weight gradient.

    python benchmarks/conv_weight_grads.py > benchmarks/results/conv_weight_grads.txt

``BatchPartitionEngine`` needs each task's weight gradient of a convolution from the output
gradients of one backward pass. Three ways to get them, timed against the one weight gradient
of a plain backward pass (``plain``):

* ``per-task``: the convolution's weight-gradient kernel (``aten.convolution_backward``) on each
  task's slice of the batch: contiguous rows, no copy; ``T`` kernel calls.
* ``grouped``: one call with the tasks as extra groups (the batch copied into a
  ``[n, T * C, ...]`` layout), equal task sizes only.
* ``unfold``: ``k x k`` columns of the input (``F.unfold``), one product per task.

Each result is checked against ``per-task`` before it is timed. Times are the 25th percentile
of 30 calls after 3 warm-up calls, one CPU thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_BACKWARD = torch.ops.aten.convolution_backward


def _weight_grad(g: Tensor, x: Tensor, w: Tensor, geometry: dict, groups: int) -> Tensor:
    dims = w.dim() - 2
    return _BACKWARD(
        g,
        x,
        w,
        None,
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
        False,
        [0] * dims,
        groups,
        [False, True, False],
    )[1]


def plain(x: Tensor, g: Tensor, w: Tensor, sizes: list[int], geometry: dict, groups: int):
    return _weight_grad(g, x, w, geometry, groups)


def per_task(x: Tensor, g: Tensor, w: Tensor, sizes: list[int], geometry: dict, groups: int):
    grads, start = [], 0
    for n in sizes:
        grads.append(_weight_grad(g[start : start + n], x[start : start + n], w, geometry, groups))
        start += n
    return torch.stack(grads)


def grouped(x: Tensor, g: Tensor, w: Tensor, sizes: list[int], geometry: dict, groups: int):
    tasks, n = len(sizes), sizes[0]
    xs = x.reshape(tasks, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
    gs = g.reshape(tasks, n, *g.shape[1:]).transpose(0, 1).reshape(n, -1, *g.shape[2:])
    repeated = w.repeat(tasks, *([1] * (w.dim() - 1)))
    return _weight_grad(gs, xs, repeated, geometry, groups * tasks).reshape(tasks, *w.shape)


def unfold(x: Tensor, g: Tensor, w: Tensor, sizes: list[int], geometry: dict, groups: int):
    columns = F.unfold(x, w.shape[2:], **geometry)  # [N, C k k, L]
    flat = g.flatten(2)  # [N, O, L]
    grads, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        grads.append(torch.einsum("nol,nkl->ok", flat[rows], columns[rows]).reshape(w.shape))
        start += n
    return torch.stack(grads)


def p25_ms(fn: Callable, *args: object, reps: int = 30) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 4] * 1e3


CONFIGS = [  # name, in, out, kernel, spatial, stride, padding, groups, task sizes
    ("conv2d 3->16 k3 32x32, T=3 x 32", 3, 16, 3, (32, 32), 1, 1, 1, [32] * 3),
    ("conv2d 16->32 k3 s2 16x16, T=3 x 32", 16, 32, 3, (16, 16), 2, 1, 1, [32] * 3),
    ("conv2d 32->32 k3 g4 8x8, T=3 x 32", 32, 32, 3, (8, 8), 1, 1, 4, [32] * 3),
    ("conv2d 16->32 k3 16x16, T=10 x 16", 16, 32, 3, (16, 16), 1, 1, 1, [16] * 10),
    ("conv1d 8->16 k5 L=64, T=3 x 32", 8, 16, 5, (64,), 1, 2, 1, [32] * 3),
]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, one CPU thread; p25 ms of 30 calls")
    print("| configuration | plain | per-task | grouped | unfold |")
    print("|---|---|---|---|---|")
    for name, c_in, c_out, k, spatial, stride, padding, groups, sizes in CONFIGS:
        dims = len(spatial)
        x = torch.randn(sum(sizes), c_in, *spatial)
        w = torch.randn(c_out, c_in // groups, *([k] * dims))
        conv = (F.conv1d, F.conv2d)[dims - 1]
        g = torch.randn_like(conv(x, w, None, stride, padding, 1, groups))
        geometry = {"stride": [stride] * dims, "padding": [padding] * dims, "dilation": [1] * dims}
        args = (x, g, w, sizes, geometry, groups)
        reference = per_task(*args)
        ways = [plain, per_task, grouped] + ([unfold] if dims == 2 and groups == 1 else [])
        cells = []
        for way in ways:
            if way is not plain:
                torch.testing.assert_close(way(*args), reference, rtol=1e-4, atol=1e-3)
            cells.append(f"{p25_ms(way, *args):.2f}")
        cells += ["n/a"] * (4 - len(cells))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
