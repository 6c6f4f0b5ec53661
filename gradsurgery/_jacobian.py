"""Per-task gradients as a data type: what every engine returns and every method reads.

An engine delivers the tasks' gradients of a list of parameters as a :class:`TaskJacobian`:
most parameters as the columns of one ``[T, P]`` matrix, some large ``nn.Linear`` weights as
:class:`FactoredGradients` that never build their ``[T, P]`` block. Methods only ask it for
Gramians, weighted combinations and a finiteness check. :class:`Engine` is the protocol an
engine follows; methods import it and the Jacobian from here, never an engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from ._validation import nonfinite_tasks

# Below this squared norm, float32 products of the gradients' elements fall in the subnormal
# range and lose more precision than the sum's own rounding: tiny / eps (about 1e-31).
_LOSSLESS_FLOOR = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps

# Below this many input features, CPU BLAS computes ``g^T x`` (a thin [out, in] result) several
# times slower than ``x^T g`` plus a transposed copy (the study's 8 -> 256 first layer among
# them). Measured on the CPU only, so other devices keep the direct product.
_THIN_INPUT = 16


def outer_sums(g: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``g^T x`` over the last two dimensions: ``[rows, out]`` and ``[rows, in]`` tensors, or
    batches of them (``[B, rows, out]``, ``[B, rows, in]``)."""
    # mm / bmm, not matmul: for batches, matmul adds four expand / reshape calls per product.
    product = torch.mm if g.dim() == 2 else torch.bmm
    if x.shape[-1] >= _THIN_INPUT or not x.is_cpu:
        return product(g.transpose(-1, -2), x, out=out)
    transposed = product(x.transpose(-1, -2), g).transpose(-1, -2)
    return transposed if out is None else out.copy_(transposed)


@dataclass(frozen=True)
class FactoredGradients:
    """Per-task gradients of one ``nn.Linear`` weight, kept as the factors autograd gives.

    Task ``t``'s gradient is ``D_t^T X_t``: the sum over its rows of the outer product of the
    output gradient and the input. Kept this way it costs ``M (in + out)`` numbers instead of
    ``T * in * out``, and both things the methods need come without the ``[T, in * out]``
    matrix: the Gramian, ``<D_s^T X_s, D_t^T X_t>`` being the sum of ``(X X^T) * (D D^T)`` over
    the ``(s, t)`` block (the "ghost norm" trick: Goodfellow 2015, Li et al. 2022), and any
    combination ``sum_t w_t D_t^T X_t = D^T diag(w_row) X``, one matmul like the plain weight
    gradient.

    Attributes
    ----------
    inputs : Tensor
        ``[M, in]`` layer inputs, one row per sample (and per position of extra dimensions).
    output_grads : Tensor
        ``[M, out]`` gradients of the summed loss with respect to the layer's outputs.
    row_tasks : Tensor
        ``[M]`` task index of every row.
    num_tasks : int
        ``T``.
    """

    inputs: Tensor
    output_grads: Tensor
    row_tasks: Tensor
    num_tasks: int

    def gramian(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[T, T]`` dot products of the tasks' weight gradients (in ``dtype`` if given)."""
        x, d = self.inputs, self.output_grads
        if dtype is not None:
            x, d = x.to(dtype), d.to(dtype)
        kernel = (x @ x.T).mul_(d @ d.T)  # <d_a x_a^T, d_b x_b^T> = (x_a . x_b)(d_a . d_b)
        one_hot = nnf.one_hot(self.row_tasks, self.num_tasks).to(kernel.dtype)
        return one_hot.T @ kernel @ one_hot

    def combine(self, weights: Tensor) -> Tensor:
        """``sum_t weights[t] D_t^T X_t``, flattened to ``[out * in]``."""
        row_weights = weights.to(self.output_grads)[self.row_tasks]
        return outer_sums(self.output_grads * row_weights[:, None], self.inputs).reshape(-1)

    def task(self, t: int) -> Tensor:
        """Task ``t``'s gradient, flattened to ``[out * in]``."""
        rows = self.row_tasks == t
        return outer_sums(self.output_grads[rows], self.inputs[rows]).reshape(-1)

    def dense(self) -> Tensor:
        """The ``[T, out * in]`` per-task gradients: the memory the factored form avoids."""
        # Each task from its own rows only: a NaN in one task's rows stays in that task.
        return torch.stack(
            [
                outer_sums(self.output_grads[rows], self.inputs[rows]).reshape(-1)
                for rows in (self.row_tasks == t for t in range(self.num_tasks))
            ]
        )


class TaskJacobian:
    """Per-task gradients of a list of parameters.

    Most parameters are stored densely, as the columns of one ``[T, P_dense]`` matrix in
    parameter order. Under :class:`BatchPartitionEngine` a large ``nn.Linear`` weight may be
    kept as :class:`FactoredGradients` instead. The methods only need the Gramian of some
    parameters, weighted combinations of the task gradients and a finiteness check: all three
    are computed here without assembling the ``[T, P]`` matrix.

    Parameters
    ----------
    dense : Tensor
        ``[T, P_dense]``: the dense parameters' per-task gradients, zeros where a task does not
        reach.
    reached : numpy.ndarray or None
        ``[T, n_params]`` bool: whether task ``i``'s autograd graph reaches parameter ``k``;
        ``None`` when every task reaches every parameter.
    numels : sequence of int
        Number of elements of every parameter.
    factored : dict, optional
        ``{parameter index: FactoredGradients}`` for the parameters left out of ``dense``.
    """

    def __init__(
        self,
        dense: Tensor,
        reached: np.ndarray | None,
        numels: Sequence[int],
        factored: dict[int, FactoredGradients] | None = None,
    ) -> None:
        self.dense = dense
        self._reached = reached
        # The usual case, asked about at every step: a bool rather than a NumPy reduction.
        self.all_reached = reached is None or bool(reached.all())
        self.numels = list(numels)
        self.factored = factored or {}
        self.num_tasks = dense.shape[0]
        self._dense_numels = (
            [n for k, n in enumerate(self.numels) if k not in self.factored]
            if self.factored
            else self.numels
        )

    @property
    def reached(self) -> np.ndarray:
        """``[T, n_params]`` bool: whether task ``i``'s autograd graph reaches parameter ``k``."""
        if self._reached is None:
            self._reached = np.ones((self.num_tasks, len(self.numels)), dtype=bool)
        return self._reached

    @property
    def matrix(self) -> Tensor:
        """The full ``[T, P]`` matrix (assembled when some parameters are factored)."""
        if not self.factored:
            return self.dense
        dense = iter(self.dense.split(self._dense_numels, dim=1))
        return torch.cat(
            [
                self.factored[k].dense() if k in self.factored else next(dense)
                for k in range(len(self.numels))
            ],
            dim=1,
        )

    def gramian(self, mask: np.ndarray | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``[T, T]`` Gramian of the parameters selected by ``mask`` (bool per parameter).

        Computed in ``dtype`` when given. Otherwise half-precision gradients give a float32
        Gramian, so that the dot products cannot overflow; and when that precision loses the
        products (a squared norm below ``tiny / eps``, where the products of tiny gradients
        underflow, or beyond the range), the Gramian is recomputed and returned in float64.
        """
        if dtype is not None:
            return self._gramian(mask, dtype)
        result = self._gramian(mask, None)
        if result.dtype != torch.float64 and self._lossy(result.diagonal().tolist(), mask):
            return self._gramian(mask, torch.float64)
        return result

    def gramian_rows(self, mask: np.ndarray | None = None) -> list[list[float]]:
        """:meth:`gramian` as Python floats (float64): one device-to-host copy, and the
        precision check on those floats rather than with further tensor calls."""
        rows = self._gramian(mask, None).tolist()
        if self.dense.dtype != torch.float64 and self._lossy(
            [row[t] for t, row in enumerate(rows)], mask
        ):
            return self._gramian(mask, torch.float64).tolist()
        return rows

    def _gramian(self, mask: np.ndarray | None, dtype: torch.dtype | None) -> Tensor:
        if dtype is None and self.dense.dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        dense = self.dense if dtype is None else self.dense.to(dtype)
        if mask is None or mask.all():
            result = dense @ dense.T
            selected = self.factored
        else:
            result = dense.new_zeros(self.num_tasks, self.num_tasks)
            for start, stop in self._column_runs(mask):  # one product per run of columns
                block = dense[:, start:stop]
                result.addmm_(block, block.T)
            selected = {k: f for k, f in self.factored.items() if mask[k]}
        for factors in selected.values():
            result += factors.gramian(result.dtype)
        return result

    def _lossy(self, squared_norms: list[float], mask: np.ndarray | None) -> bool:
        """Whether float32 squared norms (or a Gramian's diagonal) lost the products.

        Finite gradients whose products overflow give Inf; gradients around ``1e-20`` per
        element give products in (or below) the subnormal range, so that the Gramian is zero
        or imprecise and a conflict is missed. Below ``tiny / eps`` the products lose more
        than the sum's own rounding. A squared norm of exactly zero is only lossy if that
        task's gradient is not zero (one more check, in that case only).
        """
        if not math.isfinite(sum(squared_norms)):  # NaN gradients too: float64 says the same
            return True
        floor = _LOSSLESS_FLOOR
        if min(squared_norms) >= floor:
            return False
        zeros = [t for t, value in enumerate(squared_norms) if value == 0.0]
        if len(zeros) < sum(value < floor for value in squared_norms):
            return True  # a tiny nonzero squared norm
        rows = self.matrix if mask is None else self.matrix[:, self._column_mask(mask)]
        return bool(rows[zeros].any())

    def _column_mask(self, mask: np.ndarray) -> Tensor:
        columns = np.repeat(np.asarray(mask, dtype=bool), self.numels)
        return torch.from_numpy(columns).to(self.dense.device)

    def leading(self, count: int) -> TaskJacobian:
        """The per-task gradients of the first ``count`` parameters (views, no copy)."""
        # The dense parameters keep their order in ``dense``: the first ones are a prefix.
        numels = self.numels[:count]
        factored = {k: f for k, f in self.factored.items() if k < count}
        width = (
            sum(n for k, n in enumerate(numels) if k not in factored) if factored else sum(numels)
        )
        reached = None if self.all_reached else self.reached[:, :count]
        return TaskJacobian(self.dense[:, :width], reached, numels, factored)

    def squared_norms(self, mask: np.ndarray | None = None) -> Tensor:
        """``[T]`` squared norms of the task gradients on the parameters selected by ``mask``.

        The Gramian's diagonal, without its off-diagonal products (what GradNorm needs); in
        float64 when the gradients' precision loses them (see :meth:`gramian`).
        """
        result = self._squared_norms(mask, None)
        if result.dtype != torch.float64 and self._lossy(result.tolist(), mask):
            return self._squared_norms(mask, torch.float64)
        return result

    def squared_norm_values(self, mask: np.ndarray | None = None) -> list[float]:
        """:meth:`squared_norms` as Python floats (float64), checked on those floats."""
        values = self._squared_norms(mask, None).tolist()
        if self.dense.dtype != torch.float64 and self._lossy(values, mask):
            return self._squared_norms(mask, torch.float64).tolist()
        return values

    def _squared_norms(self, mask: np.ndarray | None, dtype: torch.dtype | None) -> Tensor:
        dense = self.dense
        if dtype is not None:
            dense = dense.to(dtype)
        elif dense.dtype in (torch.float16, torch.bfloat16):
            dense = dense.float()
        if mask is None or mask.all():
            if not self.factored:  # one block: two calls
                return torch.linalg.vector_norm(dense, dim=1).square()
            blocks, selected = [dense], list(self.factored.values())
        else:
            blocks = [dense[:, start:stop] for start, stop in self._column_runs(mask)]
            selected = [f for k, f in self.factored.items() if mask[k]]
        result = dense.new_zeros(self.num_tasks)
        for block in blocks:
            result += torch.linalg.vector_norm(block, dim=1).square()
        for factors in selected:
            result += factors.gramian(result.dtype).diagonal()
        return result

    def _column_runs(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """``[start, stop)`` column ranges of ``dense`` covering the selected parameters."""
        runs: list[tuple[int, int]] = []
        start = 0
        dense_mask = (bool(m) for k, m in enumerate(mask) if k not in self.factored)
        for numel, keep in zip(self._dense_numels, dense_mask, strict=True):
            if keep and runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + numel)
            elif keep:
                runs.append((start, start + numel))
            start += numel
        return runs

    def combine(self, weights: Tensor | Sequence[float]) -> list[Tensor]:
        """Per-parameter combinations of the task gradients, flattened (fresh tensors).

        ``weights`` is ``[T]`` (the same combination for every parameter) or
        ``[n_params, T]`` (row ``k`` for parameter ``k``).
        """
        weights = torch.as_tensor(weights, dtype=self.dense.dtype, device=self.dense.device)
        if weights.dim() == 1:
            # mv, not matmul: a vector-matrix matmul adds an unsqueeze and a squeeze.
            dense_parts = list(torch.mv(self.dense.t(), weights).split(self._dense_numels))
            if not self.factored:
                return dense_parts
            rows = [weights] * len(self.numels)
        elif not self.factored and self.dense.numel() <= _SPREAD_MAX_ELEMENTS:
            # A small matrix (heads, many small parameters): one product with the weights
            # spread over each parameter's columns costs less than a product per parameter.
            spread = weights.t().repeat_interleave(
                torch.tensor(self.numels, device=weights.device),
                dim=1,
                output_size=self.dense.shape[1],
            )
            return list((self.dense * spread).sum(0).split(self._dense_numels))
        else:
            rows = list(weights.unbind())
            dense_rows = [w for k, w in enumerate(rows) if k not in self.factored]
            blocks = self.dense.split(self._dense_numels, dim=1)
            dense_parts = [w @ b for w, b in zip(dense_rows, blocks, strict=True)]
        parts = iter(dense_parts)
        return [
            self.factored[k].combine(rows[k]) if k in self.factored else next(parts)
            for k in range(len(self.numels))
        ]

    def nonfinite_tasks(self) -> list[int]:
        """Tasks whose gradient holds a NaN or Inf, checked element by element.

        A factored parameter is only expanded when its Gramian is not finite.
        """
        bad = set(nonfinite_tasks(self.dense))
        for factors in self.factored.values():
            if not bool(torch.isfinite(factors.gramian().diagonal()).all()):
                bad.update(nonfinite_tasks(factors.dense()))
        return sorted(bad)


class Engine(Protocol):
    """Computes per-task gradients: the default per-task autograd engine, or a faster one.

    ``single_backward`` says whether the engine takes one backward pass for all tasks (the
    losses' graph must then be recorded in a way the engine knows).
    """

    single_backward: bool

    def jacobian(
        self,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        reuse: bool = False,
    ) -> TaskJacobian:
        """Per-task gradients of ``params``."""
        ...

    def reached_jacobian(
        self, losses: Sequence[Tensor], leading: Sequence[Tensor], *, reuse: bool = False
    ) -> tuple[list[Tensor], TaskJacobian]:
        """Per-task gradients of ``leading``, then of every other parameter the losses reach."""
        ...


# Up to this many elements of the dense matrix, a per-parameter combination spreads the
# weights over the columns and takes one elementwise product (a temporary of the matrix's
# size); above it, a product per parameter block, which allocates nothing of that size.
_SPREAD_MAX_ELEMENTS = 1 << 18
