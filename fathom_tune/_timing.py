"""Seconds JAX spends compiling, read from ``jax.monitoring`` events (one process-wide sum)."""

from __future__ import annotations

import jax

__all__ = ["compile_seconds"]

_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)
_total = [0.0]


def _listen(event: str, duration: float, **kwargs) -> None:
    if event in _EVENTS:
        _total[0] += duration


jax.monitoring.register_event_duration_secs_listener(_listen)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling JAX programs so far."""
    return _total[0]
