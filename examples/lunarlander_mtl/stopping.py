"""Stopping runs cleanly: one Ctrl-C (or SIGTERM) stops a run or the whole study.

A stop is a request: each run checks it at every environment step and at every evaluation
episode, and raises `Stopped` there. Its folder then holds what its last checkpoint holds
(the rows logged after it are dropped on resume and their work redone exactly), so
`--resume` continues as if nothing happened. A second Ctrl-C stops at once; the
checkpoint, written atomically, is still the last one.

In the parallel study the main process relays the request to its workers (which ignore
Ctrl-C themselves: the terminal sends it to every process of the group), and a worker whose
main process disappeared stops too rather than go on writing alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report them


class Stopped(Exception):
    """A run stopped on request at a safe point; its checkpoint covers `episodes_saved`."""

    def __init__(self, config_name: str, seed: int, episodes_saved: int, total: int):
        super().__init__(config_name, seed, episodes_saved, total)
        self.config_name, self.seed = config_name, seed
        self.episodes_saved, self.total = episodes_saved, total

    def __str__(self) -> str:
        return (
            f"{self.config_name} seed {self.seed}: stopped, its checkpoint holds "
            f"{self.episodes_saved} of {self.total} episodes"
        )


class StopFlag:
    """Set once a stop was requested. Reading it is one attribute read (every env step)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


@contextlib.contextmanager
def on_stop_signals(first: Callable[[str], None], again: Callable[[str], None]) -> Iterator[None]:
    """Call `first(name)` on the first SIGINT/SIGTERM and `again(name)` on any later one.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    received = []

    def handler(signum, _frame) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        (first if len(received) == 1 else again)(name)

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def watch_in_worker(
    flag: StopFlag,
    stop_event,
    parent_pid: int,
    idle: threading.Event,
    poll_s: float = 1.0,
    grace_s: float = 60.0,
) -> None:
    """In a worker process: Ctrl-C is the main process's business; a SIGTERM or the main
    process's stop event set `flag`. If the main process dies, the worker sets `flag`, waits
    (at most `grace_s`) until its run has stopped (`idle` is set between runs) and exits:
    nobody is left to hand it another run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: flag.set("SIGTERM"))

    def watch() -> None:
        while not stop_event.wait(poll_s):
            if os.getppid() != parent_pid:
                flag.set("the study's main process ended")
                idle.wait(grace_s)
                os._exit(1)
        flag.set("stop requested")

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()
