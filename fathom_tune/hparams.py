"""FedAvg client hyperparameters and their bounds.

The three hyperparameters that FATHOM ("Federated Hypergradient Descent",
A. K. Kan, arXiv 2211.02106) tunes, with the integer conventions of the
project's FATHOM_SPEC:

* ``learning_rate`` (eta): the client SGD learning rate.
* ``local_epochs`` (E), real-valued: client ``i`` with ``n_i`` examples runs
  ``K_i = max(ceil(E * n_i / B_int), 1)`` local steps.
* ``batch_size`` (B), real-valued: every local step uses exactly
  ``B_int = max(round_half_up(B), 1)`` examples.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fathom_tune import checks

__all__ = ["NAMES", "Bounds", "ClientHParams", "HParams", "batch_int", "local_step_counts", "local_steps"]

NAMES = ("learning_rate", "local_epochs", "batch_size")
"""The three hyperparameters, in the one order used everywhere (vectors, grids, tables)."""


def batch_int(batch_size: float) -> int:
    """``B_int = max(round_half_up(B), 1)``.

    >>> batch_int(2.5), batch_int(2.49), batch_int(0.2)
    (3, 2, 1)
    """
    return max(math.floor(batch_size + 0.5), 1)


def local_step_counts(local_epochs, num_examples, batch_ints) -> np.ndarray:
    """``K_i = max(ceil(E * n_i / B_int), 1)`` of many clients at once: the one place
    this rule is computed (in float64, as Python's float arithmetic does).

    ``local_epochs``, ``num_examples`` and ``batch_ints`` (``B_int``, already
    integers) are arrays or scalars that broadcast together; the counts come
    back as int64.

    >>> local_step_counts(1.0, np.array([130, 7, 0]), 20).tolist()
    [7, 1, 1]
    >>> local_step_counts(np.array([1.0, 2.5]), 47, np.array([7, 5])).tolist()
    [7, 24]
    """
    epochs = np.asarray(local_epochs, np.float64)
    steps = np.ceil(epochs * np.asarray(num_examples, np.int64) / np.asarray(batch_ints, np.int64))
    return np.maximum(steps, 1.0).astype(np.int64)


def local_steps(local_epochs: float, num_examples: int, batch_size: float) -> int:
    """``K_i = max(ceil(E * n_i / B_int), 1)`` of one client (:func:`local_step_counts`).

    >>> local_steps(1.0, 130, 20.0), local_steps(0.01, 130, 20.0), local_steps(2.0, 7, 256.0)
    (7, 1, 1)
    """
    return int(local_step_counts(local_epochs, num_examples, batch_int(batch_size)))


@dataclasses.dataclass(frozen=True)
class HParams:
    """One round's client hyperparameters.

    Example:
        >>> hp = HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0)
        >>> hp.batch_int, hp.local_steps(130)
        (20, 7)
    """

    learning_rate: float
    local_epochs: float
    batch_size: float

    def __post_init__(self):
        for name in NAMES:
            object.__setattr__(self, name, checks.positive_finite(name, getattr(self, name)))

    @property
    def batch_int(self) -> int:
        return batch_int(self.batch_size)

    def local_steps(self, num_examples: int) -> int:
        return local_steps(self.local_epochs, num_examples, self.batch_size)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in NAMES}


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Lower and upper bounds on the hyperparameters (inclusive).

    Example:
        >>> b = Bounds(lower=HParams(1e-3, 0.1, 1.0), upper=HParams(1.0, 10.0, 256.0))
        >>> b.contains(HParams(0.1, 1.0, 20.0))
        True
        >>> b.clip(HParams(5.0, 1.0, 0.5))
        HParams(learning_rate=1.0, local_epochs=1.0, batch_size=1.0)
    """

    lower: HParams
    upper: HParams

    def __post_init__(self):
        for side in ("lower", "upper"):
            if not isinstance(getattr(self, side), HParams):
                raise TypeError(f"Bounds.{side} must be an HParams, got {getattr(self, side)!r}")
        for name in NAMES:
            lo, hi = getattr(self.lower, name), getattr(self.upper, name)
            if lo > hi:
                raise ValueError(
                    f"Bounds: lower {name}={lo!r} is greater than upper {name}={hi!r}; "
                    "lower must be <= upper"
                )

    def contains(self, hparams: HParams) -> bool:
        return all(
            getattr(self.lower, n) <= getattr(hparams, n) <= getattr(self.upper, n) for n in NAMES
        )

    def check(self, hparams: HParams, what: str = "hparams") -> None:
        """Raises ``ValueError`` naming the first hyperparameter outside the bounds."""
        for n in NAMES:
            lo, v, hi = getattr(self.lower, n), getattr(hparams, n), getattr(self.upper, n)
            if not lo <= v <= hi:
                raise ValueError(f"{what}.{n}={v!r} is outside the bounds [{lo!r}, {hi!r}]")

    def clip(self, hparams: HParams) -> HParams:
        return HParams(
            **{
                n: min(max(getattr(hparams, n), getattr(self.lower, n)), getattr(self.upper, n))
                for n in NAMES
            }
        )


@dataclasses.dataclass(frozen=True)
class ClientHParams:
    """One round's hyperparameters per sampled client (FedEx gives each client its own).

    Attributes:
        clients: one :class:`HParams` per sampled client, in the order of
            :meth:`fathom_tune.Engine.sampled` (ascending client index).
        summary: what the round records as its hyperparameters (e.g. the
            tuner's current choice).

    Example:
        >>> a, b = HParams(0.1, 1.0, 8.0), HParams(0.01, 2.0, 16.0)
        >>> ClientHParams(clients=(a, b), summary=a).clients[1].batch_int
        16
    """

    clients: tuple[HParams, ...]
    summary: HParams

    def __post_init__(self):
        clients = tuple(self.clients) if isinstance(self.clients, (list, tuple)) else self.clients
        if not isinstance(clients, tuple) or not clients or not all(isinstance(h, HParams) for h in clients):
            raise TypeError(f"ClientHParams.clients must be a non-empty sequence of HParams, got {self.clients!r}")
        if not isinstance(self.summary, HParams):
            raise TypeError(f"ClientHParams.summary must be an HParams, got {self.summary!r}")
        object.__setattr__(self, "clients", clients)

    def as_dict(self) -> dict[str, float]:
        return self.summary.as_dict()
