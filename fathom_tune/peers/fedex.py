"""FedEx's inner loop: one FedAvg run whose clients each train with a sampled configuration.

"Federated Hyperparameter Tuning: Challenges, Baselines, and Connections to
Weight-Sharing" (M. Khodak, R. Tu, T. Li, L. Li, M.-F. Balcan, V. Smith,
A. Talwalkar, NeurIPS 2021, arXiv 2106.04502); reference code: ``hyper.py``
of the authors' FedEx repository (class ``FedEx``), and FederatedScope's
``autotune/fedex/server.py`` (``update_policy``), which has the same logic.

For each tuned hyperparameter ``i`` with candidates ``C_i`` (``n_i`` arms) the
server keeps logits ``z_i`` (uniform at the start, ``z_i = -log n_i``) and
``theta_i = exp(z_i)``. Every round each sampled client ``j`` draws an arm
``a_{j,i} ~ theta_i`` per hyperparameter and trains with that configuration;
it reports its validation loss before (``before_j``, the server model) and
after (``after_j``, its own model) local training on its held-out part, whose
size is its weight. With ``omega_j`` the normalised weights and
``s_j = after_j`` (``after_j - before_j`` with ``diff``):

* baseline ``lambda_t``: the discounted mean of the earlier rounds'
  ``R_tau = sum_j omega_j after_j`` (0 in the first round; discount 0: the
  last value, 1: the plain mean);
* gradient per arm: ``g_i[k] = sum_j omega_j (s_j - lambda_t) 1[a_{j,i} = k] / theta_i[k]``
  (:func:`arm_gradient`);
* step: ``z_i <- z_i - eta_{t,i} g_i``, ``eta_{t,i} = sqrt(2 log n_i) / D``
  with ``D = ||g_i||_inf`` ("aggressive", the authors' setting in their
  wrapped runs; 1 when ``g_i = 0``) or ``D = sqrt(t)`` ("auto",
  FederatedScope's default), then ``z_i <- z_i - logsumexp(z_i)``
  (:func:`exponentiated_step`).

The paper wraps this loop in a random search or successive halving over
server settings; on a fixed server optimizer (plain FedAvg) the inner loop
alone is the one-run method. The model returned is the run's final model;
the configuration reported is ``argmax theta``. The optional entropy cutoff:
once the distribution's entropy (:func:`entropy`, summed over the
hyperparameters) falls below a threshold after a round's step, exploration
stops for the rest of the run: every client trains with the argmax
configuration and the distribution stays as it is.

:class:`FedEx` runs it on the project's engine, as every one-run tuner runs
(:mod:`fathom_tune.tuning.one_run`). A diverged round (non-finite loss or
update) is discarded as FATHOM discards it; FedEx scores each client whose
validation loss is not finite with twice the largest finite loss of the
round, so the arms it drew lose weight. With the safety net on (the default),
a rejected round scores every client with the worst loss (:func:`rejected_score`),
so all its arms lose weight, and leaves the baseline as it was; after
``patience`` rejections the next round trains with the last accepted round's arms.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fathom_tune import checks
from fathom_tune.engine import Engine, RoundResult
from fathom_tune.hparams import NAMES, ClientHParams, HParams
from fathom_tune.tuning.one_run import OneRunSchedule, OneRunTuner

__all__ = [
    "FEDEX_ARMS", "FEDEX_BASELINE", "FEDEX_CANDIDATES", "FEDEX_EXPLORING", "FEDEX_THETA",
    "SCHEDULES", "FedEx", "arm_gradient", "discounted_sums", "entropy", "exponentiated_step",
    "fedex_candidates", "logsumexp", "rejected_score"
]

SCHEDULES = ("aggressive", "auto")
"""FedEx's step-size schedules (see :func:`exponentiated_step`)."""

# FedEx's own record keys (the shared schema is fathom_tune.storage.record's)
FEDEX_ARMS = "fedex.arms"
"""Each sampled client's configuration in a FedEx round: ``[[eta, E, B], ...]``."""
FEDEX_THETA = "fedex.theta"
"""FedEx's distribution after the round: ``{name: [probability per arm]}``."""
FEDEX_CANDIDATES = "fedex.candidates"
"""Study attr of a FedEx run: its arms, ``{name: [value per arm]}``."""
FEDEX_BASELINE = "fedex.baseline"
"""The baseline ``lambda_t`` a FedEx round's gradient used."""
FEDEX_EXPLORING = "fedex.exploring"
"""Whether FedEx still samples its clients' arms after the round (False: past its entropy cutoff)."""


def logsumexp(z) -> float:
    """``log sum exp z``, computed stably.

    >>> round(logsumexp([0.0, 0.0]), 6) == round(math.log(2), 6)
    True
    """
    z = np.asarray(z, np.float64)
    top = float(z.max())
    return top + math.log(float(np.exp(z - top).sum()))


def arm_gradient(arms, theta, omega, scores, baseline: float) -> np.ndarray:
    """FedEx's importance-weighted gradient of one hyperparameter's logits.

    Args:
        arms: the arm each client drew, ints in ``[0, n)``.
        theta: the arms' probabilities (``n``).
        omega: the clients' normalised weights.
        scores: the clients' ``s_j``.
        baseline: ``lambda_t``.

    Returns:
        ``g[k] = sum_j omega_j (s_j - baseline) 1[arms_j = k] / theta[k]``.

    Example:
        >>> arm_gradient([0, 1, 1], [0.5, 0.5], [0.2, 0.3, 0.5], [1.0, 2.0, 0.0], 1.0).tolist()
        [0.0, -0.4]
    """
    arms = np.asarray(arms, np.int64)
    theta = np.asarray(theta, np.float64)
    contrib = np.asarray(omega, np.float64) * (np.asarray(scores, np.float64) - float(baseline))
    g = np.zeros(len(theta))
    np.add.at(g, arms, contrib)
    return g / theta


def exponentiated_step(z, g, t: int, schedule: str = "aggressive") -> np.ndarray:
    """One exponentiated-gradient step on logits ``z``, renormalised by logsumexp.

    Args:
        z: the logits (``log theta``).
        g: their gradient (:func:`arm_gradient`).
        t: the number of this update (1 for the first).
        schedule: ``"aggressive"`` (``D = max |g|``, 1 when ``g = 0``) or
            ``"auto"`` (``D = sqrt(t)``); the step is ``sqrt(2 log n) / D``.

    Example:
        >>> z = exponentiated_step(np.log([0.5, 0.5]), np.array([1.0, 0.0]), t=1)
        >>> np.exp(z).round(4).tolist()
        [0.2355, 0.7645]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    z = np.asarray(z, np.float64)
    g = np.asarray(g, np.float64)
    base = math.sqrt(2.0 * math.log(len(z)))
    if schedule == "aggressive":
        top = float(np.abs(g).max()) if len(g) else 0.0
        denominator = top if top > 0.0 else 1.0
    else:
        denominator = math.sqrt(t)
    z = z - base / denominator * g
    return z - logsumexp(z)


def discounted_sums(sums: tuple[float, float], value: float, discount: float) -> tuple[float, float]:
    """The running sums of the discounted mean after one more round's ``R``.

    ``sums = (numerator, denominator)``, ``(0, 0)`` before the first round; the
    baseline ``lambda_t`` is ``numerator / denominator`` (0 while it is 0):
    ``sum_tau discount^(t-1-tau) R_tau / sum_tau discount^(t-1-tau)``, so
    discount 0 gives the last value and 1 the plain mean.

    >>> s = discounted_sums(discounted_sums((0.0, 0.0), 1.0, 0.0), 3.0, 0.0)
    >>> s[0] / s[1]
    3.0
    >>> s = discounted_sums(discounted_sums((0.0, 0.0), 1.0, 1.0), 3.0, 1.0)
    >>> s[0] / s[1]
    2.0
    """
    numerator, denominator = sums
    return discount * numerator + value, discount * denominator + 1.0


def rejected_score(before, after, baseline: float) -> float:
    """Every client's score in a rejected round: twice the largest of the round's finite
    validation losses and ``|baseline|`` (1 when all are 0), so the round's arms lose weight.

    >>> rejected_score([1.0, float("nan")], [3.0, float("inf")], 0.5)
    6.0
    """
    values = np.abs(np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in (before, after)]))
    worst = max(float(values[np.isfinite(values)].max(initial=0.0)), abs(float(baseline)))
    return 2.0 * worst if worst > 0 else 1.0


def entropy(thetas) -> float:
    """The joint entropy (nats) of independent distributions: ``sum_i -sum_k theta_i[k] log theta_i[k]``.

    >>> round(entropy([[0.5, 0.5], [1.0, 0.0, 0.0]]), 6) == round(math.log(2), 6)
    True
    """
    total = 0.0
    for theta in thetas:
        p = np.asarray(theta, np.float64)
        p = p[p > 0]
        total += float(-(p * np.log(p)).sum())
    return total


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


class _FedExSchedule(OneRunSchedule):
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
        # the last accepted round's arms, and whether the next round trains with them (patience ran out)
        self.accepted, self.forced = np.zeros((self.clients, len(NAMES)), np.int64), False

    def theta(self) -> dict[str, np.ndarray]:
        return {n: np.exp(z) for n, z in self.z.items()}

    def _config(self, picks) -> HParams:
        return HParams(**{n: self.candidates[n][int(k)] for n, k in zip(NAMES, picks)})

    def propose(self, round_index: int) -> ClientHParams:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, round_index, 0xFE]))
        theta = self.theta()
        if self.forced:
            arms = self.accepted
        elif self.exploring:
            arms = np.stack(
                [rng.choice(len(theta[n]), size=self.clients, p=theta[n] / theta[n].sum()) for n in NAMES], axis=1
            )
        else:  # past the entropy cutoff: every client trains with the most likely arms
            arms = np.tile([int(np.argmax(self.z[n])) for n in NAMES], (self.clients, 1))
        self.arms = arms
        return ClientHParams(clients=tuple(self._config(a) for a in arms), summary=self.returned())

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        if accepted:
            self.accepted, self.forced = self.arms, False
        before = np.asarray(result.validation_before, np.float64)
        after = np.asarray(result.validation_after, np.float64)
        weight = np.asarray(result.validation_size, np.float64)
        attrs = {FEDEX_ARMS: [list(h.as_dict().values()) for h in result.client_hparams]}
        if not self.exploring:
            return {**attrs, FEDEX_THETA: _listed(self.theta()), FEDEX_EXPLORING: False}
        finite = np.concatenate([before[np.isfinite(before)], after[np.isfinite(after)]])
        if finite.size == 0 or weight.sum() == 0:
            return {**attrs, FEDEX_THETA: _listed(self.theta())}
        penalty = 2.0 * float(np.abs(finite).max())
        after = np.where(np.isfinite(after), after, penalty)
        before = np.where(np.isfinite(before), before, penalty)
        omega = weight / weight.sum()
        baseline = self._move(omega, after - before if self.config.diff else after)
        self.sums = discounted_sums(self.sums, float(omega @ after), self.config.discount)
        attrs.update({FEDEX_THETA: _listed(self.theta()), FEDEX_BASELINE: baseline})
        if self.config.cutoff:
            self.exploring = entropy(self.theta().values()) >= self.config.cutoff
            attrs[FEDEX_EXPLORING] = self.exploring
        return attrs

    def rejected(self, result: RoundResult, rejection) -> dict:
        attrs = {FEDEX_ARMS: [list(h.as_dict().values()) for h in result.client_hparams]}
        self.forced, weight = bool(rejection.reset and rejection.back_to), np.asarray(result.validation_size)
        if not self.exploring or weight.sum() == 0:
            return {**attrs, FEDEX_THETA: _listed(self.theta())}
        worst = rejected_score(result.validation_before, result.validation_after, self._baseline())
        baseline = self._move(weight / weight.sum(), np.full(len(weight), worst))  # every arm drawn loses
        return {**attrs, FEDEX_THETA: _listed(self.theta()), FEDEX_BASELINE: baseline}

    def _baseline(self) -> float:
        return self.sums[0] / self.sums[1] if self.sums[1] > 0 else 0.0

    def _move(self, omega, scores) -> float:
        baseline, theta = self._baseline(), self.theta()
        self.updates += 1
        for i, n in enumerate(NAMES):
            g = arm_gradient(self.arms[:, i], theta[n], omega, scores, baseline)
            self.z[n] = exponentiated_step(self.z[n], g, self.updates, self.config.schedule)
        return baseline

    def returned(self) -> HParams:
        return self._config([int(np.argmax(self.z[n])) for n in NAMES])

    def trees(self) -> dict:
        return {
            "back": {"arms": np.asarray(self.accepted, np.int64), "forced": np.asarray(self.forced, np.bool_)},
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
        self.accepted = np.asarray(trees["back"]["arms"], np.int64)
        self.forced = bool(trees["back"]["forced"])


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

    def schedule_for(self, engine: Engine) -> OneRunSchedule:
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
        return {FEDEX_CANDIDATES: {n: list(v) for n, v in fedex_candidates(task, self.factors()).items()}}
