"""``fathom-auto``: FATHOM's hypergradients with a step that adapts, and a run that guards itself.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106) moves
``log eta`` by ``gamma_eta * H`` with ``gamma_eta = 0.01``: with ``|H|`` under 0.1 on
real tasks, a learning rate ten times too high takes hundreds of rounds to come
down, while the local hypergradient ``G`` shrinks ``B`` ten times faster and adds
local steps at that rate. ``fathom-auto`` keeps the paper's ``H`` and ``G`` and
changes how they are used:

* **An adaptive step on log eta** (Adam, Kingma and Ba, arXiv 1412.6980, applied to
  a hyperparameter as in Baydin et al., "Online Learning Rate Adaptation with
  Hypergradient Descent", arXiv 1703.04782): ``m = b1 m + (1 - b1) H``,
  ``s = b2 s + (1 - b2) H^2``, bias-corrected ``m_hat``, ``s_hat``, and
  ``log eta += rate * m_hat / (sqrt(s_hat) + eps)``: a consistent ``H`` moves eta by
  about ``rate`` (5%) a round whatever its size.
* **Local work only while the updates agree**: E and B move by FATHOM's rule
  (``log E += gamma_E (H + G)``, ``log B -= gamma_B G``) with ``G`` counted only
  while the smoothed ``m_hat`` is positive, so a learning rate that makes the
  updates disagree is not given more steps.
* **The safety net** of the one-run driver (:class:`fathom_tune.SafetyNet`): a
  non-finite or blown-up round is dropped, eta halved, E and B undone.
* **A validation guard** (early stopping with a return to the best model, as in
  Prechelt, "Early Stopping - But When?", 1998): when validation falls more than
  ``rollback`` (relative) below its best, the run returns to the best model and its
  hyperparameters with eta halved, and the adaptive step starts over.

Everything is checkpointed (the schedule's trees hold ``p``, the Adam moments and the
best model), so a resumed run ends as an uninterrupted one.

Example:
    >>> import fathom_tune
    >>> out = fathom_tune.tuners.get("fathom-auto").run(fathom_tune.tasks.digits().replace(num_rounds=3))
    >>> len(out.study.trials), sorted(out.history.columns)[:2]
    (3, ['G', 'H'])
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fathom_tune import checks
from fathom_tune.engine import FEDAVG_SERVER, Engine, RoundResult
from fathom_tune.fathom.hypergrad import LocalAgreement, track_agreement
from fathom_tune.fathom.sampler import report_divergence, report_round
from fathom_tune.fathom.schedule import HypergradientSchedule, _Attrs
from fathom_tune.fathom.state import DIVERGED_LR_FACTOR
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.tuning.one_run import OneRunSchedule, OneRunTuner
from fathom_tune.tuning.safety import Rejection

__all__ = ["AUTO_ROLLBACK", "AutoConfig", "FathomAuto", "auto_step"]

AUTO_ROLLBACK = "fathom-auto.rollback"
"""Trial attribute of an evaluation round after which the run returned to its best model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoConfig:
    """``fathom-auto``'s settings.

    Attributes:
        rate: the adaptive step's size on ``log eta`` (about the relative move of eta
            per round while ``H`` keeps its sign).
        beta1, beta2: the moving averages of ``H`` and ``H^2``.
        eps: added to ``sqrt(s_hat)``; an ``|H|`` well under it moves eta less.
        gamma_local_epochs, gamma_batch_size: FATHOM's rates of ``log E`` and ``log B``
            (``gamma_B`` half the paper's 0.1).
        alpha: smoothing of FATHOM's moving average ``m`` of updates (``H = cos(m, u)``).
        rollback: return to the best model when validation is worse than the best by
            more than this share of it; ``None``: never.
    """

    rate: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 0.01
    gamma_local_epochs: float = 0.01
    gamma_batch_size: float = 0.05
    alpha: float = 0.5
    rollback: float | None = 0.1

    def __post_init__(self):
        checks.positive_finite("rate", self.rate)
        checks.fraction("beta1", self.beta1)
        checks.fraction("beta2", self.beta2)
        checks.positive_finite("eps", self.eps)
        checks.nonnegative_real("gamma_local_epochs", self.gamma_local_epochs)
        checks.nonnegative_real("gamma_batch_size", self.gamma_batch_size)
        checks.fraction("alpha", self.alpha)
        if self.rollback is not None:
            checks.fraction("rollback", self.rollback)

    def settings(self) -> dict:
        return {"method": "fathom-auto", **dataclasses.asdict(self)}


def auto_step(p, moments, H: float, G: float, config: AutoConfig, lower, upper):
    """One ``fathom-auto`` step on ``p = log([eta, E, B])`` after an accepted round.

    ``moments = (m, s, t)``: the moving averages of ``H`` and ``H^2`` and the count
    of steps so far. Returns the next ``p`` (clipped to ``log lower``, ``log upper``)
    and moments.

    Example (worked by hand: ``m = 0.1 * 0.5``, ``s = 0.01 * 0.25``; bias-corrected
    ``0.5`` and ``0.25``; ``0.05 * 0.5 / (0.5 + 0.01)``; ``0.01 * (0.5 + 0.2)``;
    ``-0.05 * 0.2``):
        >>> p, moments = auto_step([0.0, 0.0, 3.0], (0.0, 0.0, 0), 0.5, 0.2, AutoConfig(),
        ...                        lower=(1e-3, 0.1, 1.0), upper=(10.0, 10.0, 256.0))
        >>> [round(x, 6) for x in p], [round(x, 6) for x in moments[:2]], moments[2]
        ([0.04902, 0.007, 2.99], [0.05, 0.0025], 1)
    """
    m, s, t = moments
    c = config
    t += 1
    m = c.beta1 * m + (1.0 - c.beta1) * H
    s = c.beta2 * s + (1.0 - c.beta2) * H * H
    m_hat, s_hat = m / (1.0 - c.beta1**t), s / (1.0 - c.beta2**t)
    agree = 1.0 if m_hat > 0 else 0.0
    moves = (c.rate * m_hat / (math.sqrt(s_hat) + c.eps), c.gamma_local_epochs * (H + agree * G),
             -c.gamma_batch_size * agree * G)
    out = [min(max(p[i] + moves[i], math.log(lower[i])), math.log(upper[i])) for i in range(3)]
    return out, (m, s, t)


class _AutoSchedule(HypergradientSchedule):
    """``fathom-auto`` on the one-run driver (see the module docstring)."""

    def __init__(self, engine: Engine, config: AutoConfig):
        task = engine.task
        self.config, self.bounds = config, task.bounds
        self.lower = [getattr(task.bounds.lower, n) for n in NAMES]
        self.upper = [getattr(task.bounds.upper, n) for n in NAMES]
        self.p = [math.log(getattr(task.bounds.clip(task.init_hparams), n)) for n in NAMES]
        self.moments = (0.0, 0.0, 0)
        self.mode = 1.0 if task.target.mode == "max" else -1.0
        self.metric = task.target.metric
        self.best = -math.inf  # mode * the best validation metric so far
        self.best_p = list(self.p)
        shapes = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        self.best_params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        self.accepted = None  # the last accepted round's hyperparameters
        self._restart = self._evaluated = None
        self._row: dict = {}

    def propose(self, round_index: int) -> HParams:
        return self._hparams(self.p)

    def _hparams(self, p) -> HParams:
        return self.bounds.clip(HParams(*[float(math.exp(x)) for x in p]))

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        self._seen(result, accepted)
        H, G = self._row["H"], self._row["G"]
        reported = _Attrs()
        if not accepted:  # non-finite without a net: halve eta
            report_divergence(reported)
            self.p[0] = max(self.p[0] + math.log(DIVERGED_LR_FACTOR), math.log(self.lower[0]))
            return dict(reported)
        report_round(reported, G=G, H=H)
        H, G = float(np.clip(H, -1.0, 1.0)), float(np.clip(G, -1.0, 1.0))
        self.accepted = result.hparams
        self.p = [math.log(getattr(result.hparams, n)) for n in NAMES]
        self.p, self.moments = auto_step(self.p, self.moments, H, G, self.config, self.lower, self.upper)
        return dict(reported)

    def rejected(self, result: RoundResult, rejection: Rejection) -> dict:
        self._seen(result, False)
        back = rejection.back_to or result.hparams
        eta = back.learning_rate if rejection.reset else result.hparams.learning_rate * DIVERGED_LR_FACTOR
        self.p = [math.log(v) for v in (eta, back.local_epochs, back.batch_size)]
        self.p[0] = max(self.p[0], math.log(self.lower[0]))
        return {}

    def observed(self, result: RoundResult, metrics, accepted: bool) -> None:
        self._restart = None
        if not metrics or self.metric not in metrics:
            return
        value = self.mode * float(metrics[self.metric])
        limit = self.config.rollback
        if limit is not None and math.isfinite(self.best) and value < self.best - limit * abs(self.best):
            self._restart = self.best_params
            self.p = list(self.best_p)
            self.p[0] = max(self.p[0] + math.log(DIVERGED_LR_FACTOR), math.log(self.lower[0]))
            self.moments = (0.0, 0.0, 0)
            self._row[AUTO_ROLLBACK] = 1.0
        elif value > self.best:
            self.best, self.best_p = value, list(self.p)
            self.best_params = self._evaluated

    def evaluated(self, params) -> None:
        # a copy: the engine may reuse the buffers of the model it continues from
        self._evaluated = jax.tree_util.tree_map(jnp.copy, params)

    def restart_model(self):
        return self._restart

    def columns(self, attrs: dict) -> dict:
        return {"H": self._row.get("H", math.nan), "G": self._row.get("G", math.nan),
                "rollback": self._row.pop(AUTO_ROLLBACK, 0.0)}

    def returned(self) -> HParams:
        return self._hparams(self.p)

    def trees(self) -> dict:
        m, s, t = self.moments
        return {
            "auto": {"p": np.asarray(self.p, np.float64), "best_p": np.asarray(self.best_p, np.float64),
                     "moments": np.asarray([m, s, t, self.best], np.float64)},
            "best_params": self.best_params,
        }

    def restore(self, trees: dict) -> None:
        auto = trees["auto"]
        self.p, self.best_p = auto["p"].tolist(), auto["best_p"].tolist()
        m, s, t, best = auto["moments"].tolist()
        self.moments, self.best = (m, s, int(t)), best
        self.best_params = jax.tree_util.tree_map(jnp.asarray, trees["best_params"])



@dataclasses.dataclass(frozen=True)
class FathomAuto(OneRunTuner):
    """``fathom-auto`` as a registered one-run tuner (see the module docstring).

    Attributes:
        name: the registry name (``"fathom-auto"``).
        config: its :class:`AutoConfig`.
        safety_net: keyword only; the one-run driver's net (on by default).
    """

    name: str = "fathom-auto"
    config: AutoConfig = AutoConfig()

    def schedule_for(self, engine: Engine) -> OneRunSchedule:
        return _AutoSchedule(engine, self.config)

    def settings(self) -> dict:
        return self.config.settings()

    def engine_options(self, task) -> dict:
        server = _SERVERS.setdefault(self.config.alpha, track_agreement(FEDAVG_SERVER, self.config.alpha))
        return {"client_statistic": LocalAgreement(), "server_optimizer": server}


_SERVERS: dict = {}
"""One server rule per ``alpha``: engines with the same rule share compiled programs."""
