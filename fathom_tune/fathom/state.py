"""FATHOM's state and settings: ``p = log(hyperparameters)``, its step, and the config.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
keeps the tuned values in log space, ``p = log([eta, E, B])`` (in the
order of :data:`fathom_tune.hparams.NAMES`: learning rate, local epochs,
batch size), and moves them once per round (:func:`egn_step`):
``log eta += gamma_eta H``, ``log E += gamma_E (H + G)``,
``log B -= gamma_B G``, with ``p`` clipped to the bounds. The other half of
its state, the moving average ``m`` of updates with its smoothing ``alpha``,
is :class:`~fathom_tune.fathom.ServerTracker`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from fathom_tune import checks
from fathom_tune.hparams import NAMES, Bounds, HParams

__all__ = [
    "DIVERGED_LR_FACTOR",
    "FathomConfig",
    "egn_step",
    "hparams_from_log",
    "log_hparams",
    "next_hparams",
    "rejected_hparams",
]

DIVERGED_LR_FACTOR = 0.5
"""The learning rate of the round after a diverged one, relative to the diverged round's."""


def log_hparams(hparams: HParams) -> np.ndarray:
    """``p = log([eta, E, B])`` (float64, in the order of :data:`~fathom_tune.hparams.NAMES`).

    >>> log_hparams(HParams(learning_rate=1.0, local_epochs=1.0, batch_size=1.0)).tolist()
    [0.0, 0.0, 0.0]
    """
    return np.log(np.array([getattr(hparams, n) for n in NAMES], dtype=np.float64))


def hparams_from_log(p) -> HParams:
    """The :class:`HParams` ``exp(p)`` of ``p = log([eta, E, B])``.

    >>> hparams_from_log([0.0, 0.0, 0.0])
    HParams(learning_rate=1.0, local_epochs=1.0, batch_size=1.0)
    """
    values = np.exp(_vector3("p", p))
    return HParams(**{n: float(v) for n, v in zip(NAMES, values)})


def _vector3(name: str, value) -> np.ndarray:
    out = np.asarray(value, dtype=np.float64)
    if out.shape != (3,):
        raise ValueError(f"{name} must have shape (3,) in the order {NAMES}, got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def egn_step(p, H: float, G: float, gamma, lower, upper) -> np.ndarray:
    """One FATHOM hyper step on ``p = log([eta, E, B])``, clipped to the bounds.

    ``log eta += gamma_eta H``, ``log E += gamma_E (H + G)``,
    ``log B -= gamma_B G``; then ``p`` itself is clipped into
    ``[log lower, log upper]``, so it never winds up past a bound: one step in
    the other direction moves away from the bound at once.

    Args:
        p: ``log([eta, E, B])``, shape (3,).
        H: the global hypergradient of the round.
        G: the local hypergradient of the round.
        gamma: ``(gamma_eta, gamma_E, gamma_B)``, each >= 0.
        lower: ``(eta, E, B)`` lower bounds (> 0, natural units).
        upper: ``(eta, E, B)`` upper bounds (natural units).

    Returns:
        The next ``p``, float64 array of shape (3,).

    Example:
        >>> p = np.log([0.1, 1.0, 20.0])
        >>> q = egn_step(p, H=0.5, G=0.8, gamma=(0.01, 0.01, 0.1), lower=(1e-3, 0.1, 1.0),
        ...              upper=(1.0, 10.0, 256.0))
        >>> np.round(q - p, 6).tolist()  # [0.01*0.5, 0.01*(0.5+0.8), -0.1*0.8]
        [0.005, 0.013, -0.08]
    """
    p = _vector3("p", p)
    gamma = _vector3("gamma", gamma)
    lower, upper = _vector3("lower", lower), _vector3("upper", upper)
    if np.any(lower <= 0) or np.any(lower > upper):
        raise ValueError(
            f"need 0 < lower <= upper, got lower={lower.tolist()}, upper={upper.tolist()}"
        )
    H, G = _finite("H", H), _finite("G", G)
    return np.array(_step(p.tolist(), H, G, gamma.tolist(), np.log(lower).tolist(), np.log(upper).tolist()))


def _step(p, H: float, G: float, gamma, log_lower, log_upper) -> list[float]:
    """:func:`egn_step` on checked arguments (sequences of three Python floats), the bounds
    already in log space. Element by element: the IEEE operations NumPy's arrays would do
    (a product, a sum, a clip), without NumPy's per-call cost on three numbers."""
    moves = (H, H + G, -G)
    return [min(max(p[i] + gamma[i] * moves[i], log_lower[i]), log_upper[i]) for i in range(3)]


@functools.lru_cache(maxsize=64)
def _box(config: FathomConfig) -> tuple[tuple[float, ...], ...]:
    """``config``'s gamma, bounds and log bounds as Python floats (built once per config:
    a run's every round uses them)."""
    bounds = config.bounds
    lower = np.array([getattr(bounds.lower, n) for n in NAMES])
    upper = np.array([getattr(bounds.upper, n) for n in NAMES])
    arrays = (_vector3("gamma", config.gamma), lower, upper, np.log(lower), np.log(upper))
    return tuple(tuple(a.tolist()) for a in arrays)


def next_hparams(used: HParams, H: float, G: float, config: FathomConfig, *, diverged: bool = False) -> HParams:
    """FATHOM's hyper step, the one every FATHOM path takes: the next round's hyperparameters
    after a round that ran with ``used``.

    :class:`~fathom_tune.FathomSampler` (its ask-and-tell suggestions, hence the
    Flower strategy) and :func:`~fathom_tune.optimize`'s schedule both call it
    through :meth:`FathomSampler.after`. It is :func:`egn_step` (the same
    arithmetic on ``log(used)``) made hyperparameters exactly; after a
    ``diverged`` round it is ``used`` with the learning rate times
    :data:`DIVERGED_LR_FACTOR`, clipped to the bounds (``H``, ``G`` unused).

    ``exp(log(x))`` is not always ``x`` (``3 -> 3.0000000000000004``), and
    ``ceil(E n / B)`` then gains a step wherever ``E n / B`` is an integer. So
    a hyperparameter whose hyper learning rate is 0 keeps its value bit for
    bit, and one that the step puts on a bound takes the bound's value exactly.

    Args:
        used: the hyperparameters of the round just finished.
        H, G: its hypergradients.
        config: a resolved :class:`FathomConfig` (``bounds`` set).
        diverged: the round diverged.

    Example:
        >>> b = Bounds(HParams(1e-3, 0.01, 1.0), HParams(1.0, 10.0, 256.0))
        >>> cfg = FathomConfig(bounds=b, gamma_local_epochs=0.0)
        >>> next_hparams(HParams(0.1, 3.0, 20.0), 0.5, 0.2, cfg).local_epochs
        3.0
    """
    if diverged:
        eta = used.learning_rate * DIVERGED_LR_FACTOR
        return config.bounds.clip(dataclasses.replace(used, learning_rate=eta))
    gamma, lower, upper, log_lower, log_upper = _box(config)
    used = [getattr(used, n) for n in NAMES]
    p = _step(np.log(used).tolist(), _finite("H", H), _finite("G", G), gamma, log_lower, log_upper)
    values = []
    for i, q in enumerate(p):
        if gamma[i] == 0.0:
            values.append(min(max(used[i], lower[i]), upper[i]))
        elif q <= log_lower[i]:
            values.append(lower[i])
        elif q >= log_upper[i]:
            values.append(upper[i])
        else:
            values.append(min(max(float(np.exp(q)), lower[i]), upper[i]))
    return HParams(*values)


def rejected_hparams(used: HParams, back_to: HParams | None, reset: bool, config: FathomConfig) -> HParams:
    """FATHOM's back-off after a round the safety net rejected (:class:`fathom_tune.SafetyNet`):
    the next round's hyperparameters.

    The rejected round's learning rate times :data:`DIVERGED_LR_FACTOR`, with the
    local epochs and batch size of the last accepted round ``back_to`` (that
    round's moves of E and B are undone; ``used``'s while no round was accepted),
    clipped to the bounds; with ``reset`` (the net's patience ran out) ``back_to``
    itself.

    Example:
        >>> b = Bounds(HParams(1e-3, 0.01, 1.0), HParams(1.0, 10.0, 256.0))
        >>> rejected_hparams(HParams(0.8, 2.5, 5.4), HParams(0.7, 2.0, 5.5), False, FathomConfig(bounds=b))
        HParams(learning_rate=0.4, local_epochs=2.0, batch_size=5.5)
    """
    if reset and back_to is not None:
        return back_to
    kept = used if back_to is None else back_to
    halved = HParams(used.learning_rate * DIVERGED_LR_FACTOR, kept.local_epochs, kept.batch_size)
    return config.bounds.clip(halved)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FathomConfig:
    """FATHOM's settings; the defaults are the paper's.

    Attributes:
        init: the first round's hyperparameters; ``None`` takes the task's
            defaults.
        bounds: the box the hyperparameters stay in (``p`` is clipped to it);
            ``None`` takes the task's bounds.
        gamma_learning_rate: ``gamma_eta``, hyper learning rate of ``log eta``
            (default 0.01).
        gamma_local_epochs: ``gamma_E``, hyper learning rate of ``log E``
            (default 0.01).
        gamma_batch_size: ``gamma_B``, hyper learning rate of ``log B``
            (default 0.1).
        alpha: smoothing of the moving average ``m`` of global updates, in
            ``[0, 1)`` (default 0.5); it lives with ``m`` in
            :class:`~fathom_tune.fathom.ServerTracker`.

    A hyper learning rate of 0 freezes that hyperparameter.

    Example:
        >>> FathomConfig(gamma_batch_size=0.05).gamma
        (0.01, 0.01, 0.05)
    """

    init: HParams | None = None
    bounds: Bounds | None = None
    gamma_learning_rate: float = 0.01
    gamma_local_epochs: float = 0.01
    gamma_batch_size: float = 0.1
    alpha: float = 0.5

    def __post_init__(self):
        if self.init is not None and not isinstance(self.init, HParams):
            raise TypeError(f"FathomConfig.init must be an HParams or None, got {self.init!r}")
        if self.bounds is not None and not isinstance(self.bounds, Bounds):
            raise TypeError(f"FathomConfig.bounds must be a Bounds or None, got {self.bounds!r}")
        for name in ("gamma_learning_rate", "gamma_local_epochs", "gamma_batch_size", "alpha"):
            value = checks.nonnegative_real(f"FathomConfig.{name}", getattr(self, name))
            object.__setattr__(self, name, value)
        if not self.alpha < 1.0:
            raise ValueError(f"FathomConfig.alpha must be in [0, 1), got {self.alpha!r}")
        if self.init is not None and self.bounds is not None:
            self.bounds.check(self.init, what="FathomConfig.init")

    @property
    def gamma(self) -> tuple[float, float, float]:
        """``(gamma_eta, gamma_E, gamma_B)``, in the order of :data:`~fathom_tune.hparams.NAMES`."""
        return (self.gamma_learning_rate, self.gamma_local_epochs, self.gamma_batch_size)

    def resolve(self, task) -> FathomConfig:
        """This config with ``init`` and ``bounds`` taken from ``task`` where None.

        Raises:
            ValueError: the resulting ``init`` lies outside the resulting ``bounds``.
        """
        if self.init is not None and self.bounds is not None:
            return self  # checked in __post_init__
        if self.init is None and self.bounds is None:
            return dataclasses.replace(self, init=task.init_hparams, bounds=task.bounds)  # Task checked
        init, bounds = self.init or task.init_hparams, self.bounds or task.bounds
        bounds.check(init, "config.init" if self.init is not None else "task.init_hparams")
        return dataclasses.replace(self, init=init, bounds=bounds)

    def settings(self) -> dict:
        """The hyper learning rates and ``alpha`` as a dict (for records and fingerprints)."""
        return {n: getattr(self, n) for n in ("gamma_learning_rate", "gamma_local_epochs", "gamma_batch_size", "alpha")}
