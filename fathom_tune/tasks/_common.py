"""Helpers shared by the task builders: argument checks and data containers."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import fedjax
import numpy as np


def check_seed(name: str, value) -> int:
    """Returns ``value`` as an int >= 0, or raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def check_int_range(name: str, value, low: int, high: int | None = None) -> int:
    """Returns ``value`` as an int in ``[low, high]`` (``high=None``: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """Returns ``value`` if it is a bool, or raises naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_nonnegative_real(name: str, value) -> float:
    """Returns ``value`` as a finite float >= 0, or raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value) -> float:
    """Returns ``value`` as a float in the open interval (0, 1), or raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return float(value)


def check_fractions(validation_fraction, test_fraction) -> tuple[float, float]:
    """Checks the two held-out shares: each in (0, 1), together below 1."""
    validation_fraction = check_fraction("validation_fraction", validation_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction!r} + test_fraction={test_fraction!r} "
            "must be < 1 to leave data for training"
        )
    return validation_fraction, test_fraction


def holdout_counts(num: int, validation_fraction, test_fraction) -> tuple[int, int, int]:
    """Numbers of (train, validation, test) units when holding out whole units.

    Each held-out split gets ``round(fraction * num)`` units, at least one; the
    rest train, and at least one must be left.

    >>> holdout_counts(30, 0.2, 0.2), holdout_counts(5, 0.1, 0.1)
    ((18, 6, 6), (3, 1, 1))
    """
    validation_fraction, test_fraction = check_fractions(validation_fraction, test_fraction)
    num_val = max(1, round(validation_fraction * num))
    num_test = max(1, round(test_fraction * num))
    num_train = num - num_val - num_test
    if num_train < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction!r} and test_fraction={test_fraction!r} "
            f"hold out {num_val} + {num_test} of {num} units, leaving {num_train} for "
            "training; at least 1 is required (use smaller fractions or more units)"
        )
    return num_train, num_val, num_test


def in_memory(clients: Mapping[bytes, Mapping[str, np.ndarray]]) -> fedjax.InMemoryFederatedData:
    """``fedjax.InMemoryFederatedData`` over ``client id -> {'x': ..., 'y': ...}``."""
    return fedjax.InMemoryFederatedData(dict(clients))


def classification_metrics() -> dict[str, fedjax.metrics.Metric]:
    """The evaluation metrics of every built-in classifier."""
    return {"loss": fedjax.metrics.CrossEntropyLoss(), "accuracy": fedjax.metrics.Accuracy()}


def classification_loss(batch, preds):
    """Per-example cross-entropy, the ``train_loss`` of every built-in classifier."""
    return fedjax.metrics.unreduced_cross_entropy_loss(batch["y"], preds)
