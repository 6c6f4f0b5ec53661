"""Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._weighting import Decision, Method, Needs, TaskStats
from ..functional._dwa import _dwa_weights
from ..functional._losses import as_floats, require_positive, require_positive_number

__all__ = ["DWA"]

_WINDOWS = ("epoch", "step")


class DWA(Method):
    """Dynamic Weight Average: weigh each task by how slowly its loss is falling.

    ``w_k = K softmax_k(r / T)`` with the descending rate ``r_k = L_k(t-1) / L_k(t-2)``, the
    ratio of task ``k``'s average losses over the two latest windows (see
    :func:`~gradsurgery.functional.dwa_weights`). During the first two windows, before two
    averages exist, every weight is 1 (the paper's and the authors' warm-up).

    Parameters
    ----------
    temperature : float
        ``T > 0`` (default 2, the paper's).
    window : {"epoch", "step"}
        ``"epoch"`` (the paper): the windows are epochs, ``L_k(t)`` is the average of task
        ``k``'s loss over epoch ``t``; call :meth:`end_epoch` at the end of every epoch
        (through the wrapper: ``opt.method.end_epoch()``, with ``opt = gs.DWA(optimizer)``).
        ``"step"``: every step is a window, ``L_k(t)`` is the loss of step ``t``.

    Notes
    -----
    The losses must be positive: the rates are ratios of them.

    Examples
    --------
    >>> from gradsurgery._weighting import TaskStats
    >>> from gradsurgery.methods.dwa import DWA
    >>> method = DWA(window="step")
    >>> for losses in [(2.0, 1.0), (1.0, 1.0)]:  # the warm-up: weights 1
    ...     method.commit(method.decide(TaskStats(losses=losses)).state)
    >>> [round(w, 4) for w in method.decide(TaskStats(losses=(1.0, 1.0))).weights]
    [0.8756, 1.1244]
    """

    needs = Needs.LOSSES

    def __init__(self, temperature: float = 2.0, *, window: str = "epoch") -> None:
        require_positive_number(temperature, "temperature")
        if window not in _WINDOWS:
            raise ValueError(f"window must be one of {_WINDOWS}, got {window!r}")
        self.temperature = float(temperature)
        self.window = window
        self.reset()

    def reset(self) -> None:
        self._averages: list[list[float]] = []  # the latest two closed windows, oldest first
        self._window_sum: list[float] | None = None  # the open epoch's loss sums
        self._window_count = 0

    def decide(self, stats: TaskStats) -> Decision:
        losses = list(stats.losses)
        require_positive(losses, "DWA (its descending rates are loss ratios)")
        averages = self._averages
        if averages and len(averages[-1]) != len(losses):
            raise ValueError(
                f"DWA saw {len(averages[-1])} tasks so far, got {len(losses)} losses; call "
                "reset() before changing the number of tasks"
            )
        if len(averages) < 2:
            weights = [1.0] * len(losses)
        else:
            weights = _dwa_weights(averages[1], averages[0], self.temperature)
        if self.window == "step":
            state = ([*averages[-1:], losses], None, 0)
        elif self._window_sum is None:
            state = (averages, losses, 1)
        else:
            sums = [s + loss for s, loss in zip(self._window_sum, losses, strict=True)]
            state = (averages, sums, self._window_count + 1)
        return Decision(weights=weights, state=state)

    def commit(self, state: Any) -> None:
        self._averages, self._window_sum, self._window_count = state

    def end_epoch(self) -> None:
        """Close the epoch's window (``window="epoch"``): its average loss becomes ``L(t-1)``.

        An epoch without steps changes nothing.
        """
        if self.window != "epoch":
            raise RuntimeError("end_epoch() closes epoch windows; this DWA has window='step'")
        if self._window_sum is None:
            return
        average = [s / self._window_count for s in self._window_sum]
        self._averages = [*self._averages[-1:], average]
        self._window_sum, self._window_count = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "averages": [list(a) for a in self._averages],
            "window_sum": None if self._window_sum is None else list(self._window_sum),
            "window_count": self._window_count,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        expected = {"averages", "window_sum", "window_count"}
        if set(state_dict) != expected:
            raise ValueError(
                f"not a DWA state: expected keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        averages = [as_floats(a, "averages") for a in state_dict["averages"]]
        window_sum = state_dict["window_sum"]
        if window_sum is not None:
            window_sum = as_floats(window_sum, "window_sum")
        count = state_dict["window_count"]
        sizes = {len(a) for a in averages} | ({len(window_sum)} if window_sum else set())
        if len(averages) > 2 or len(sizes) > 1 or not isinstance(count, int) or count < 0:
            raise ValueError("not a DWA state: inconsistent averages, sums or count")
        for average in averages:
            require_positive(average, "DWA's saved averages")
        self._averages, self._window_sum, self._window_count = averages, window_sum, count

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature}, window={self.window!r})"
