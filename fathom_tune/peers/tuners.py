"""FedEx and FedHyper as registered one-run tuners on the project's engine.

See :mod:`fathom_tune.peers.fedex` and :mod:`fathom_tune.peers.fedhyper` for
the methods and their sources. Both train exactly as every other tuner does
(the one engine, plain client SGD, the task's rounds, evaluation cadence and
target), and record one trial per round through :mod:`fathom_tune.record`.

A diverged round (non-finite loss or update) is handled as FATHOM handles it:
the round's model is discarded (the run continues from the last accepted
model; the round's cost counts), its trial FAILs and is marked diverged, and
the tuner reacts: FedHyper halves the clients' base learning rate (within the
bounds), FedEx scores each client whose validation loss is not finite with
twice the largest finite loss of the round, so the arms it drew lose weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax

from fathom_tune import checks
from fathom_tune.engine import Engine, RoundResult
from fathom_tune.fathom.sampler import DIVERGED_LR_FACTOR
from fathom_tune.hparams import NAMES, ClientHParams, HParams
from fathom_tune.peers._run import OneRunTuner, PeerSchedule
from fathom_tune.peers.fedex import (
    SCHEDULES,
    arm_gradient,
    discounted_sums,
    entropy,
    exponentiated_step,
)
from fathom_tune.peers.fedhyper import (
    GM_MOMENTUM,
    ClientRate,
    KeptUpdate,
    fedhyper_server,
    keep_update,
    sl_step,
)
from fathom_tune.storage import record

__all__ = ["FEDHYPER_VARIANTS", "FedEx", "FedHyper", "fedex_candidates"]

FEDHYPER_VARIANTS = ("g", "gm", "sl", "cl", "full")
"""FedHyper's variants: server rate (G), server rate with momentum (GM), server-set client
rate (SL), client rate adapted step by step (CL), and GM with CL (FULL)."""


# ------------------------------------------------------------------ FedHyper
class _FedHyperSchedule(PeerSchedule):
    def __init__(self, engine: Engine, variant: str):
        task = engine.task
        self.variant = variant
        self.start = task.init_hparams
        self.bounds = task.bounds
        self.eta0 = float(task.init_hparams.learning_rate)
        self.a = 0.0
        zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), engine.init().params)
        self.previous = zeros  # SL: Delta_{t-1}

    def _rate(self) -> float:
        eta = self.eta0 * (1.0 + self.a) if self.variant == "sl" else self.eta0
        lo, hi = self.bounds.lower.learning_rate, self.bounds.upper.learning_rate
        return min(max(eta, lo), hi)

    def propose(self, round_index: int) -> HParams:
        return dataclasses.replace(self.start, learning_rate=self._rate())

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        if not accepted:
            self.eta0 = max(self.eta0 * DIVERGED_LR_FACTOR, self.bounds.lower.learning_rate)
            return {}
        if self.variant == "sl":
            delta = jax.tree_util.tree_map(lambda u: -np.asarray(u, np.float32), result.update)
            self.a = sl_step(self.a, self.previous, delta)
            self.previous = delta
        elif self.variant != "cl":
            server = result.opt_state
            self.a = float((server.inner if isinstance(server, KeptUpdate) else server).a)
        attrs = {} if self.variant == "cl" else {record.FEDHYPER_A: self.a}
        if self.variant in _CLIENT_RATE:
            attrs[record.FEDHYPER_BETA] = [float(b) for b in result.local_rate]
            attrs[record.FEDHYPER_BETA_MEAN] = float(np.mean(result.local_rate))
        return attrs

    def returned(self) -> HParams:
        return self.propose(-1)

    def trees(self) -> dict:
        return {
            "fedhyper": {"a": np.asarray(self.a, np.float64), "eta0": np.asarray(self.eta0, np.float64)},
            "previous": self.previous,
        }

    def restore(self, trees: dict) -> None:
        self.a = float(trees["fedhyper"]["a"])
        self.eta0 = float(trees["fedhyper"]["eta0"])
        self.previous = trees["previous"]


@dataclasses.dataclass(frozen=True)
class FedHyper(OneRunTuner):
    """FedHyper (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156) as a one-run tuner.

    The clients run plain SGD with the task's starting hyperparameters (the
    authors use SGD with momentum 0.5); the variant adapts a learning rate
    from inner products of successive global updates
    (:mod:`fathom_tune.peers.fedhyper`):

    * ``"g"``: the server's learning rate, ``1 + a_t``;
    * ``"gm"``: the same with momentum (the authors' recommended server variant);
    * ``"sl"``: the clients' learning rate ``eta_0 (1 + a_t)``, carried over
      rounds as the paper intends (the published code resets it every round);
    * ``"cl"``: each client's rate ``eta_0 beta_k`` adapted step by step
      inside its local steps (:class:`~fathom_tune.peers.fedhyper.ClientRate`);
    * ``"full"``: GM on the server and CL on the clients.

    The hyperparameters reported are the clients' starting ones (the server
    step is in the record as ``fedhyper.a`` per round, CL's factors as
    ``fedhyper.beta``, one per client, and their mean ``fedhyper.beta_mean``).

    Attributes:
        name: the registry name.
        variant: one of :data:`FEDHYPER_VARIANTS`.

    Example:
        >>> import fathom_tune
        >>> out = FedHyper("demo-gm", "gm").run(fathom_tune.tasks.digits().replace(num_rounds=3))
        >>> len(out.study.trials)
        3
    """

    name: str = "fedhyper"
    variant: str = "gm"

    def __post_init__(self):
        if self.variant not in FEDHYPER_VARIANTS:
            raise ValueError(f"variant must be one of {FEDHYPER_VARIANTS}, got {self.variant!r}")

    def schedule_for(self, engine: Engine) -> PeerSchedule:
        return _FedHyperSchedule(engine, self.variant)

    def settings(self) -> dict:
        return {"method": "fedhyper", "variant": self.variant}

    def engine_options(self, task) -> dict:
        options = {"server_optimizer": _SERVER_RULES[self.variant]} if self.variant in _SERVER_RULES else {}
        if self.variant in _CLIENT_RATE:
            options["local_rate"] = ClientRate(clients=task.clients_per_round)
        return options


_SERVER_RULES = {"g": fedhyper_server(momentum=None), "gm": fedhyper_server(momentum=GM_MOMENTUM)}
_SERVER_RULES.update({"cl": keep_update(optax.sgd(1.0)), "full": keep_update(_SERVER_RULES["gm"])})
"""Each variant's server optimizer (SL keeps plain FedAvg's); one object per rule, so
engines with the same rule share compiled programs."""
_CLIENT_RATE = ("cl", "full")
"""The variants whose clients adapt their rate step by step (FedHyper-CL)."""


# ---------------------------------------------------------------------- FedEx
def fedex_candidates(task, factors: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    """FedEx's arms: the task's starting value times each factor, within the bounds, without repeats.

    >>> import fathom_tune
    >>> fedex_candidates(fathom_tune.tasks.digits(), {"learning_rate": (0.1, 1.0, 10.0),
    ...     "local_epochs": (1.0,), "batch_size": (0.5, 1.0, 2.0)})
    {'learning_rate': (0.01, 0.1, 1.0), 'local_epochs': (1.0,), 'batch_size': (10.0, 20.0, 40.0)}
    """
    out = {}
    for n in NAMES:
        lo, hi = getattr(task.bounds.lower, n), getattr(task.bounds.upper, n)
        start = getattr(task.init_hparams, n)
        values = sorted({float(min(max(start * f, lo), hi)) for f in factors[n]})
        out[n] = tuple(float(f"{v:.12g}") for v in values)
    return out


class _FedExSchedule(PeerSchedule):
    def __init__(self, engine: Engine, config: FedEx):
        self.config = config
        self.seed = engine.seed
        self.candidates = fedex_candidates(engine.task, config.factors())
        self.z = {n: np.full(len(c), -math.log(len(c))) for n, c in self.candidates.items()}
        self.sums = (0.0, 0.0)
        self.updates = 0
        self.clients = engine.clients_per_round
        self.arms: np.ndarray | None = None
        self.exploring = True

    def theta(self) -> dict[str, np.ndarray]:
        return {n: np.exp(z) for n, z in self.z.items()}

    def _config(self, picks) -> HParams:
        return HParams(**{n: self.candidates[n][int(k)] for n, k in zip(NAMES, picks)})

    def propose(self, round_index: int) -> ClientHParams:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, round_index, 0xFE]))
        theta = self.theta()
        if self.exploring:
            arms = np.stack(
                [rng.choice(len(theta[n]), size=self.clients, p=theta[n] / theta[n].sum()) for n in NAMES], axis=1
            )
        else:  # past the entropy cutoff: every client trains with the most likely arms
            arms = np.tile([int(np.argmax(self.z[n])) for n in NAMES], (self.clients, 1))
        self.arms = arms
        return ClientHParams(clients=tuple(self._config(a) for a in arms), summary=self.returned())

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        before = np.asarray(result.validation_before, np.float64)
        after = np.asarray(result.validation_after, np.float64)
        weight = np.asarray(result.validation_size, np.float64)
        arms = self.arms
        attrs = {record.FEDEX_ARMS: [list(h.as_dict().values()) for h in result.client_hparams]}
        if not self.exploring:
            return {**attrs, record.FEDEX_THETA: _listed(self.theta()), record.FEDEX_EXPLORING: False}
        finite = np.concatenate([before[np.isfinite(before)], after[np.isfinite(after)]])
        if finite.size == 0 or weight.sum() == 0:
            return {**attrs, record.FEDEX_THETA: _listed(self.theta())}
        penalty = 2.0 * float(np.abs(finite).max())
        after = np.where(np.isfinite(after), after, penalty)
        before = np.where(np.isfinite(before), before, penalty)
        omega = weight / weight.sum()
        scores = after - before if self.config.diff else after
        baseline = self.sums[0] / self.sums[1] if self.sums[1] > 0 else 0.0
        self.updates += 1
        theta = self.theta()
        for i, n in enumerate(NAMES):
            g = arm_gradient(arms[:, i], theta[n], omega, scores, baseline)
            self.z[n] = exponentiated_step(self.z[n], g, self.updates, self.config.schedule)
        self.sums = discounted_sums(self.sums, float(omega @ after), self.config.discount)
        attrs.update({record.FEDEX_THETA: _listed(self.theta()), record.FEDEX_BASELINE: baseline})
        if self.config.cutoff:
            self.exploring = entropy(self.theta().values()) >= self.config.cutoff
            attrs[record.FEDEX_EXPLORING] = self.exploring
        return attrs

    def returned(self) -> HParams:
        return self._config([int(np.argmax(self.z[n])) for n in NAMES])

    def trees(self) -> dict:
        return {
            "z": {n: np.asarray(z, np.float64) for n, z in self.z.items()},
            "sums": np.asarray(self.sums, np.float64),
            "updates": np.asarray(self.updates, np.int64),
            **({"exploring": np.asarray(self.exploring, np.bool_)} if self.config.cutoff else {}),
        }

    def restore(self, trees: dict) -> None:
        self.z = {n: np.asarray(z, np.float64) for n, z in trees["z"].items()}
        self.sums = tuple(float(v) for v in trees["sums"])
        self.updates = int(trees["updates"])
        self.exploring = bool(trees.get("exploring", True))


def _listed(theta: dict) -> dict:
    return {n: [float(v) for v in t] for n, t in theta.items()}


@dataclasses.dataclass(frozen=True)
class FedEx(OneRunTuner):
    """FedEx's inner loop (Khodak et al., NeurIPS 2021, arXiv 2106.04502) as a one-run tuner.

    Every sampled client trains with its own (eta, E, B), drawn per
    hyperparameter from FedEx's distribution over a grid of arms: the task's
    starting value times each factor, within the task's bounds
    (:func:`fedex_candidates`). Each client holds out ``validation`` of its
    training examples (a fixed split per seed and client) and reports its
    validation loss before and after local training; the server moves the
    distribution by exponentiated gradient (:mod:`fathom_tune.peers.fedex`).
    The two validation passes count in the ledger as examples processed. The
    model returned is the run's final model; the hyperparameters reported
    are the most likely arm of each hyperparameter. Each round's trial
    records every client's configuration (``fedex.arms``) and the
    distribution after the round (``fedex.theta``).

    Attributes:
        name: the registry name.
        schedule: ``"aggressive"`` (default) or ``"auto"`` step sizes.
        discount: the baseline's discount (0: the last round's value, 1: the mean).
        diff: score ``after - before`` instead of ``after``.
        validation: the share of each client's examples held out.
        cutoff: the entropy cutoff (nats, summed over the three
            hyperparameters): once the distribution's entropy falls below it,
            every client trains with the most likely arms and the
            distribution stays (``fedex.exploring`` turns false). 0 (default):
            never; the uniform start has entropy ``sum_i log n_i``.
        learning_rate_factors, local_epochs_factors, batch_size_factors: the grid.

    Example:
        >>> import fathom_tune
        >>> out = FedEx("demo-fedex").run(fathom_tune.tasks.digits().replace(num_rounds=3))
        >>> sorted(out.study.trials[0].user_attrs["fedex.theta"])
        ['batch_size', 'learning_rate', 'local_epochs']
    """

    name: str = "fedex"
    schedule: str = "aggressive"
    discount: float = 0.0
    diff: bool = False
    validation: float = 0.2
    cutoff: float = 0.0
    learning_rate_factors: tuple[float, ...] = (0.1, 10 ** -0.5, 1.0, 10**0.5, 10.0)
    local_epochs_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    batch_size_factors: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        discount = checks.nonnegative_real("discount", self.discount)
        if discount > 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount!r}")
        object.__setattr__(self, "discount", discount)
        object.__setattr__(self, "diff", checks.boolean("diff", self.diff))
        object.__setattr__(self, "cutoff", checks.nonnegative_real("cutoff", self.cutoff))
        if isinstance(self.validation, bool) or not isinstance(self.validation, (int, float)) or not 0 < self.validation <= 0.5:
            raise ValueError(f"validation must be a share in (0, 0.5], got {self.validation!r}")
        for n in NAMES:
            field = f"{n}_factors"
            values = getattr(self, field)
            if not isinstance(values, tuple) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
            ):
                raise ValueError(f"{field} must be a non-empty tuple of positive finite numbers, got {values!r}")

    def factors(self) -> dict[str, tuple[float, ...]]:
        return {n: getattr(self, f"{n}_factors") for n in NAMES}

    def schedule_for(self, engine: Engine) -> PeerSchedule:
        return _FedExSchedule(engine, self)

    def settings(self) -> dict:
        return {
            "method": "fedex",
            "schedule": self.schedule,
            "discount": self.discount,
            "diff": self.diff,
            "validation": self.validation,
            **({"cutoff": self.cutoff} if self.cutoff else {}),
            **{f"{n}_factors": list(v) for n, v in self.factors().items()},
        }

    def engine_options(self, task) -> dict:
        return {"client_validation": float(self.validation)}

    def header(self, task) -> dict:
        return {record.FEDEX_CANDIDATES: {n: list(v) for n, v in fedex_candidates(task, self.factors()).items()}}


