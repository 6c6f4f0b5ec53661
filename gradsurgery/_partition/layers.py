"""Per-task parameter gradients of one recorded layer call: a registry by layer type.

For the layers registered here a parameter's gradient is a sum over the batch's rows of a
product of the layer's input and its output gradient, so task ``t``'s gradient is that sum
over task ``t``'s rows: ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Conv1d`` to
``nn.Conv3d``, ``nn.GroupNorm`` and ``nn.InstanceNorm1d`` to ``3d`` (without running
statistics). Each entry gives the formula and says for which of the layer's
options it holds; a layer of an unregistered type, a subclass (which may override
``forward``) or an option the formula does not cover is differentiated per task by autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .._jacobian import outer_sums

TaskGrads = Callable[
    [nn.Module, Tensor, Tensor, Sequence[int], bool, dict[str, Tensor]], dict[str, Tensor]
]
"""``(layer, input, output gradient, task sizes, weight, out) -> {name: [T, *shape]}``.

``weight=False`` leaves out a weight kept factored instead; ``out`` maps parameter names to
``[T, *shape]`` tensors the gradients may be written into (the entry returned is then that
tensor itself)."""


BatchDims = Callable[[nn.Module, Tensor], range]
"""The dimensions of a call's input that may index samples (the others are features)."""


class LayerRule(NamedTuple):
    """How one layer type's per-task gradients come from its recorded calls."""

    task_grads: TaskGrads
    parameters: frozenset[str]  # the layer's own parameter slots, as the formula reads them
    batch_dims: BatchDims
    refusal: Callable[[nn.Module], str | None]  # why this layer's options need the slow path
    in_place: bool  # the formula can write into views of the per-task matrix
    factorable: bool  # the weight may stay factored (FactoredGradients: inputs x output grads)

    def why_slow(self, module: nn.Module) -> str | None:
        """Why the formula does not hold for this layer as it is now, or ``None``."""
        if module._parameters.keys() != self.parameters:
            # weight_norm / spectral_norm (the hook-based ones) rename the weight and compute
            # it before every call: its gradient is not the formula's.
            return (
                f"its parameters are now {sorted(module._parameters)} (weight_norm, "
                "spectral_norm or a parameter replaced)"
            )
        return self.refusal(module)


LAYERS: dict[type[nn.Module], LayerRule] = {}


def register_layer(
    layer_type: type[nn.Module],
    task_grads: TaskGrads,
    *,
    parameters: tuple[str, ...],
    batch_dims: BatchDims,
    refusal: Callable[[nn.Module], str | None] = lambda module: None,
    in_place: bool = False,
    factorable: bool = False,
) -> None:
    """Put ``layer_type`` (exactly that type, not its subclasses) on the fast path."""
    LAYERS[layer_type] = LayerRule(
        task_grads, frozenset(parameters), batch_dims, refusal, in_place, factorable
    )


def task_index(sizes: Sequence[int], device: torch.device, per_sample: int = 1) -> Tensor:
    """The task of every row (``per_sample`` rows per sample), ``[sum(sizes) * per_sample]``.

    Shared between calls: do not modify it.
    """
    return _cached_task_index(tuple(sizes), device, per_sample)


@functools.lru_cache(maxsize=16)
def _cached_task_index(sizes: tuple[int, ...], device: torch.device, per_sample: int) -> Tensor:
    counts = torch.tensor(sizes, device=device) * per_sample
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def task_sums(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sum of ``values`` (``[N, ...]``) over each task's rows: ``[T, ...]``."""
    if len(set(sizes)) == 1:
        return values.reshape(len(sizes), sizes[0], *values.shape[1:]).sum(dim=1)
    out = values.new_zeros(len(sizes), *values.shape[1:])
    return out.index_add_(0, task_index(sizes, values.device), values)


def no_rows(p: Tensor) -> Tensor:
    """An empty task index, for a factored layer the losses never reached."""
    return torch.zeros(0, dtype=torch.long, device=p.device)


def linear_task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """``W_t = sum over task t's rows of g x^T``, ``b_t = sum of g`` (extra dims summed too)."""
    # From the registry, not ``module.weight``: nn.Module.__getattr__ is a Python call, and this
    # runs for every layer at every step.
    parameters = module._parameters
    in_features, out_features = parameters["weight"].shape[1], parameters["weight"].shape[0]
    dtype, has_bias = parameters["weight"].dtype, parameters["bias"] is not None
    g = grad_output if grad_output.dtype == dtype else grad_output.to(dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    grads = {}
    if len(set(sizes)) == 1:  # one batched matmul: the same FLOPs as the plain weight grad
        gs = g.reshape(len(sizes), -1, out_features)
        if weight:
            xs = x.reshape(len(sizes), -1, in_features)
            grads["weight"] = outer_sums(gs, xs, out.get("weight"))
        if has_bias:
            grads["bias"] = torch.sum(gs, dim=1, out=out.get("bias"))
        return grads
    g = g.reshape(g.shape[0], -1, out_features)
    if weight:
        x = x.reshape(x.shape[0], -1, in_features)
        starts = [sum(sizes[:t]) for t in range(len(sizes))]
        grads["weight"] = torch.stack(
            [
                outer_sums(
                    g[a : a + n].reshape(-1, out_features),
                    x[a : a + n].reshape(-1, in_features),
                )
                for a, n in zip(starts, sizes, strict=True)
            ]
        )
    if has_bias:
        grads["bias"] = task_sums(g.sum(dim=1), sizes)
    return grads


def linear_factors(
    module: nn.Module, x: Tensor, grad_output: Tensor, sizes: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """A Linear call's rows: inputs ``[M, in]``, output gradients ``[M, out]``, tasks ``[M]``."""
    weight = module._parameters["weight"]
    dtype, (out_features, in_features) = weight.dtype, weight.shape
    inputs = x.detach().to(dtype).reshape(-1, in_features)  # kept beyond the no_grad
    rows_per_sample = inputs.shape[0] // x.shape[0]
    row_tasks = task_index(sizes, x.device, rows_per_sample)
    return inputs, grad_output.to(dtype).reshape(-1, out_features), row_tasks


def embedding_task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Token ``k`` of task ``t`` adds its output gradient to row ``k`` of task ``t``'s table.

    With ``scale_grad_by_freq`` each token's gradient is divided by the token's count in the
    whole call (all tasks' rows), as autograd does for every task's loss.
    """
    assert isinstance(module, nn.Embedding)
    embeddings = module._parameters["weight"]
    tokens = x.reshape(-1)
    tasks = task_index(sizes, x.device, tokens.shape[0] // x.shape[0])
    g = grad_output.reshape(-1, embeddings.shape[1]).to(embeddings.dtype)
    if module.scale_grad_by_freq:
        counts = torch.bincount(tokens, minlength=embeddings.shape[0])
        g = g / counts[tokens].unsqueeze(1).to(g.dtype)
    table = out["weight"].zero_() if out else g.new_zeros(len(sizes), *embeddings.shape)
    table.index_put_((tasks, tokens), g, accumulate=True)  # one call for every task
    if module.padding_idx is not None:
        table[:, module.padding_idx] = 0
    return {"weight": table}


def layer_norm_task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """``gamma_t = sum over task t's rows of g * normalized(x)``, ``beta_t = sum of g``."""
    assert isinstance(module, nn.LayerNorm)
    shape = tuple(module.normalized_shape)
    num_rows = x.shape[0]
    normalized = nnf.layer_norm(x.to(grad_output.dtype), shape, eps=module.eps)
    g = grad_output.reshape(num_rows, -1, *shape)
    grads = {}
    if module.weight is not None:
        product = (g * normalized.reshape(g.shape)).sum(dim=1)
        grads["weight"] = task_sums(product, sizes).to(module.weight.dtype)
    if module.bias is not None:
        grads["bias"] = task_sums(g.sum(dim=1), sizes).to(module.bias.dtype)
    return grads


def _conv_geometry(module: nn.Module, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input as the convolution reads it, and the padding to pass with it.

    A non-zero ``padding_mode`` pads the input before a convolution with no padding, and
    ``padding="same"`` may pad one side more than the other: both become an explicit pad.
    """
    assert isinstance(module, nn.modules.conv._ConvNd)
    dims = len(module.kernel_size)
    if module.padding_mode != "zeros":
        padded = nnf.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return padded, [0] * dims
    if module.padding == "valid":
        return x, [0] * dims
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if all(total % 2 == 0 for total in totals):
            return x, [total // 2 for total in totals]
        pads = [p for total in reversed(totals) for p in (total // 2, total - total // 2)]
        return nnf.pad(x, pads), [0] * dims
    return x, list(module.padding)  # type: ignore[arg-type]


def conv_task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Task ``t``'s weight gradient: the convolution's weight-gradient kernel on its rows.

    The kernel a plain backward pass runs once, applied to each task's slice of the batch
    (contiguous rows, no copy): about the plain weight gradient's cost in all. Measured on
    the CPU (benchmarks/conv_weight_grads.py), an unfold into ``k x k`` columns is several
    times slower; one grouped convolution over the tasks copies the batch into a
    task-by-channel layout, needs equal task sizes, and wins only on small layers.
    """
    assert isinstance(module, nn.modules.conv._ConvNd)
    parameters = module._parameters
    kernel = parameters["weight"]
    dtype = kernel.dtype
    g = grad_output if grad_output.dtype == dtype else grad_output.to(dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    grads = {}
    if weight:
        x, padding = _conv_geometry(module, x)
        table = out.get("weight")
        if table is None:
            table = kernel.new_empty(len(sizes), *kernel.shape)
        start = 0
        for t, n in enumerate(sizes):
            table[t] = torch.ops.aten.convolution_backward(
                g[start : start + n],
                x[start : start + n],
                kernel,
                None,
                list(module.stride),
                padding,
                list(module.dilation),
                False,
                [0] * len(module.kernel_size),
                module.groups,
                [False, True, False],
            )[1]
            start += n
        grads["weight"] = table
    if parameters["bias"] is not None:
        per_sample = g.sum(dim=tuple(range(2, g.dim())))
        grads["bias"] = task_sums(per_sample, sizes)
    return grads


def per_sample_norm_task_grads(
    module: nn.Module,
    x: Tensor,
    grad_output: Tensor,
    sizes: Sequence[int],
    weight: bool,
    out: dict[str, Tensor],
) -> dict[str, Tensor]:
    """GroupNorm / InstanceNorm: per-channel ``sum of g * normalized(x)`` and ``sum of g``."""
    parameters = module._parameters
    dtype = grad_output.dtype
    if isinstance(module, nn.GroupNorm):
        normalized = nnf.group_norm(x.to(dtype), module.num_groups, eps=module.eps)
    else:
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        normalized = nnf.instance_norm(x.to(dtype), eps=module.eps)
    g = grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1)
    grads = {}
    if parameters["weight"] is not None:
        product = (g * normalized.reshape(g.shape)).sum(dim=2)
        grads["weight"] = task_sums(product, sizes).to(parameters["weight"].dtype)
    if parameters["bias"] is not None:
        grads["bias"] = task_sums(g.sum(dim=2), sizes).to(parameters["bias"].dtype)
    return grads


def _embedding_refusal(module: nn.Module) -> str | None:
    assert isinstance(module, nn.Embedding)
    if module.sparse:
        return "it has sparse=True (sparse gradients)"
    if module.max_norm is not None:
        return "it has max_norm (the table is renormalized in place at every call)"
    return None


register_layer(
    nn.Linear,
    linear_task_grads,
    parameters=("weight", "bias"),
    batch_dims=lambda module, x: range(x.dim() - 1),  # [*, in]
    in_place=True,
    factorable=True,
)
register_layer(
    nn.Embedding,
    embedding_task_grads,
    parameters=("weight",),
    batch_dims=lambda module, x: range(x.dim()),  # [*] indices
    refusal=_embedding_refusal,
    in_place=True,
)
register_layer(
    nn.LayerNorm,
    layer_norm_task_grads,
    parameters=("weight", "bias"),
    # [*, *normalized_shape]
    batch_dims=lambda module, x: range(x.dim() - len(module.normalized_shape)),  # type: ignore[arg-type]
)


def _batched(spatial_dims: int) -> BatchDims:
    """Dim 0 is the batch when the input has it (``[N, C, *spatial]``), else there is none."""
    return lambda module, x: range(1) if x.dim() == spatial_dims + 2 else range(0)


def _instance_norm_refusal(module: nn.Module) -> str | None:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    if module.track_running_stats:
        return "it has track_running_stats (in eval mode it normalizes by running statistics)"
    return None


for _dims, _conv in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), start=1):
    register_layer(
        _conv,
        conv_task_grads,
        parameters=("weight", "bias"),
        batch_dims=_batched(_dims),
        in_place=True,
    )
register_layer(
    nn.GroupNorm,
    per_sample_norm_task_grads,
    parameters=("weight", "bias"),
    batch_dims=lambda module, x: range(1),  # [N, C, *]: always batched
)
for _dims, _norm in enumerate((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), start=1):
    register_layer(
        _norm,
        per_sample_norm_task_grads,
        parameters=("weight", "bias"),
        batch_dims=_batched(_dims),
        refusal=_instance_norm_refusal,
    )
