"""Argument checks for every public entry point, one exception type per kind of mistake.

A value of the wrong *type* raises ``TypeError``; a value of the right type
outside what is allowed raises ``ValueError``. Every message names the
argument, the value it got and what is allowed, so the caller can act on it.

Example:
    >>> positive_int("num_rounds", 5)
    5
    >>> seed("seed", -1)
    Traceback (most recent call last):
    ...
    ValueError: seed must be an int >= 0, got -1
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "boolean",
    "fraction",
    "int_range",
    "nonnegative_real",
    "positive_finite",
    "positive_int",
    "seed",
]


def _integral(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def int_range(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (``high=None``: unbounded).

    >>> int_range("points", 3, 1, 10)
    3
    """
    value = _integral(name, value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1."""
    return int_range(name, value, 1)


def seed(name: str, value) -> int:
    """``value`` as an int >= 0 (seeds, worker indices)."""
    value = _integral(name, value)
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def positive_finite(name: str, value) -> float:
    """``value`` as a finite float > 0."""
    value = _real(name, value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def nonnegative_real(name: str, value) -> float:
    """``value`` as a finite float >= 0."""
    value = _real(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def fraction(name: str, value) -> float:
    """``value`` as a float in the open interval (0, 1)."""
    value = _real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value
