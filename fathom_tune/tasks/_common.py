"""Helpers shared by the task builders: held-out splits and data containers."""

from __future__ import annotations

from collections.abc import Mapping

import fedjax
import numpy as np

from fathom_tune import checks


def check_fractions(validation_fraction, test_fraction) -> tuple[float, float]:
    """Checks the two held-out shares: each in (0, 1), together below 1."""
    validation_fraction = checks.fraction("validation_fraction", validation_fraction)
    test_fraction = checks.fraction("test_fraction", test_fraction)
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
