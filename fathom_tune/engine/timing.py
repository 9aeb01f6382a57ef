"""Seconds JAX spends compiling, read from ``jax.monitoring`` events (one process-wide sum).

JAX reports tracing, lowering and XLA compilation as durations when each
ends, and a program that calls other jitted functions reports theirs while
its own is still running: a nested function's tracing lies inside its
caller's. Adding the durations up counts that time twice (a round program
of the engine nests dozens), so the sum here is the length of the union of
the intervals ``[end - duration, end]``.
"""

from __future__ import annotations

import threading
import time

import jax

__all__ = ["compile_seconds"]

_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class _Union:
    """The total length of a union of intervals, given one interval at a time.

    Intervals arrive by end time (an enclosing one after those it encloses),
    so a new interval merges with the last merged ones it overlaps.
    """

    def __init__(self) -> None:
        self.merged: list[list[float]] = []  # disjoint [start, end], by start
        self.total = 0.0
        self.lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self.lock:
            while self.merged and self.merged[-1][1] >= start:
                s, e = self.merged.pop()
                self.total -= e - s
                start, end = min(start, s), max(end, e)
            self.merged.append([start, end])
            self.total += end - start
            if len(self.merged) > 4096:  # old intervals never merge again: keep their sum only
                del self.merged[:2048]


_union = _Union()


def _listen(event: str, duration: float, **kwargs) -> None:
    if event in _EVENTS:
        end = time.perf_counter()
        _union.add(end - duration, end)


jax.monitoring.register_event_duration_secs_listener(_listen)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling JAX programs so far
    (time inside nested programs counted once)."""
    return _union.total
