"""Python floats into a tensor at a third of ``torch.tensor``'s cost: the pipeline does it at
every step (the loss weights as backward seeds, a learned weighting's gradient)."""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["floats_tensor"]


def floats_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new 1-d tensor of ``values`` in ``dtype`` on ``device``.

    Single and double precision are read straight from a packed buffer (the tensor owns it);
    other dtypes, rounded from Python's doubles, take ``torch.tensor``.
    """
    typecode = _TYPECODES.get(dtype)
    if typecode is None:
        return torch.tensor(values, dtype=dtype, device=device)
    tensor = torch.frombuffer(array.array(typecode, values), dtype=dtype)
    return tensor if device.type == "cpu" else tensor.to(device)


_TYPECODES = {torch.float32: "f", torch.float64: "d"}
