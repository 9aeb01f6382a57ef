"""FATHOM as an Optuna sampler: one trial per communication round.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). :class:`FathomSampler` plugs it into any federated loop
through Optuna's ask-and-tell interface:

1. ``trial = study.ask()``; ``hp = sampler.suggest(trial)`` suggests
   ``learning_rate``, ``local_epochs`` and ``batch_size``;
2. the loop runs one FedAvg round with ``hp`` and computes the round's
   hypergradients ``G`` and ``H`` (helpers: :class:`ClientTracker`,
   :func:`aggregate_round`, :class:`ServerTracker`);
3. ``report_round(trial, G=G, H=H)``, then ``study.tell(trial, train_loss)``.

The sampler's state lives in the study's storage only: every suggestion is
recomputed from the finished trials, so a study reloaded from SQLite, a
journal file or any Optuna storage continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, final

import jax.numpy as jnp
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from fathom_tune.fathom.state import (
    DIVERGED_LR_FACTOR,
    FathomConfig,
    next_hparams,
    rejected_hparams,
)
from fathom_tune.hparams import NAMES, Bounds, HParams
from fathom_tune.storage.optuna_internals import set_trial_system_attr, storage_of, study_id_of
from fathom_tune.storage.record import REJECTED, REJECTION, log_distributions

__all__ = [
    "DIVERGED_LR_FACTOR", "FATHOM_DIVERGED", "FATHOM_G", "FATHOM_H", "FATHOM_REJECTED",
    "FathomSampler", "report_divergence", "report_round"
]

# FATHOM's own record keys (the shared schema is fathom_tune.storage.record's)
FATHOM_G = "fathom.G"
"""The round's local hypergradient ``G = sum_i w_i phi_i``."""
FATHOM_H = "fathom.H"
"""The round's global hypergradient ``H = cos(m, u)``."""
FATHOM_DIVERGED = "fathom.diverged"
"""``True``: the round diverged; the next round halves its learning rate."""
FATHOM_REJECTED = "fathom.rejected"
"""Trial *system* attr: why FathomSampler refused a completed round."""
G_ATTR, H_ATTR, DIVERGED_ATTR, REJECTED_ATTR = FATHOM_G, FATHOM_H, FATHOM_DIVERGED, FATHOM_REJECTED

_FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def _hypergradient_value(value) -> float | None:
    """``value`` as a float clamped to [-1, 1], or ``None`` if it is not a finite
    real number within ``1e-6`` of that interval."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    elif getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.number):
        value = float(value)  # 0-d NumPy/JAX array
    else:
        return None
    if not math.isfinite(value) or abs(value) > 1.0 + 1e-6:
        return None
    return min(max(value, -1.0), 1.0)


def report_round(trial: optuna.Trial, *, G: float, H: float) -> None:
    """Records a round's hypergradients on its trial; call before ``study.tell``.

    Args:
        trial: the round's running trial.
        G: the local hypergradient (:func:`aggregate_round`), in ``[-1, 1]``.
        H: the global hypergradient (:class:`ServerTracker`), in ``[-1, 1]``.

    Values within ``1e-6`` outside ``[-1, 1]`` (rounding) are clamped.

    Raises:
        ValueError: if ``G`` or ``H`` is not a finite number in ``[-1, 1]``.

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> trial = study.ask()
        >>> report_round(trial, G=0.9, H=0.0)
        >>> trial.user_attrs == {"fathom.G": 0.9, "fathom.H": 0.0}
        True
    """
    checked = {G_ATTR: _hypergradient_value(G), H_ATTR: _hypergradient_value(H)}
    for name, key, value in (("G", G_ATTR, G), ("H", H_ATTR, H)):
        if checked[key] is None:
            raise ValueError(
                f"report_round: {name} must be a finite number in [-1, 1], got {value!r}"
            )
    for key, value in checked.items():
        trial.set_user_attr(key, value)


def report_divergence(trial: optuna.Trial) -> None:
    """Marks a round as diverged (sets user attr ``fathom.diverged = True``).

    Tell the trial afterwards in any state (typically
    ``study.tell(trial, state=optuna.trial.TrialState.FAIL)``); the next
    round's learning rate is the diverged round's times
    :data:`DIVERGED_LR_FACTOR` (see :class:`FathomSampler`).
    """
    trial.set_user_attr(DIVERGED_ATTR, True)


@final
class FathomSampler(BaseSampler):
    """FATHOM's hyperparameter schedule as an Optuna sampler, one trial per round.

    The sampler suggests ``learning_rate``, ``local_epochs`` and
    ``batch_size`` (log-scale :class:`~optuna.distributions.FloatDistribution`
    within ``bounds``; :meth:`suggest` asks for all three). Any other
    parameter is sampled by an internal :class:`~optuna.samplers.RandomSampler`
    seeded with ``seed``. Objective values are never read: the value may be
    anything (the project stores the round's training loss, direction
    minimize), single- or multi-objective.

    **Rounds.** A trial is a round when its params hold all three names.
    A ``COMPLETE`` round must carry the user attrs ``fathom.G`` and
    ``fathom.H`` (:func:`report_round`); :meth:`after_trial` raises
    ``ValueError`` at ``study.tell`` otherwise, and also for a completed trial
    that holds only some of the three names. Optuna stores such a trial as
    ``COMPLETE`` anyway, so the sampler marks it with the system attr
    ``fathom.rejected`` and skips it afterwards. An unmarked ``COMPLETE``
    round without valid ``G``/``H`` (added with ``study.add_trial`` or told
    under another sampler) makes the next suggestion raise ``ValueError``.

    **State, derived from storage.** Walking back from the newest finished
    round, the first round that counts decides the next suggestion:

    * a round the safety net rejected (user attrs ``rejected``, ``rejection``):
      :func:`~fathom_tune.fathom.state.rejected_hparams` of what it records;
    * a round with user attr ``fathom.diverged = True`` (any state,
      :func:`report_divergence`): its own hyperparameters with the learning
      rate times :data:`DIVERGED_LR_FACTOR`, clipped to the bounds
      (``log eta += log 0.5``). Consecutive divergences halve again. The loop
      should discard a diverged round's model and keep ``m`` unchanged.
    * a ``COMPLETE`` round: the EGN step (:func:`egn_step`) from
      ``p = log`` of the hyperparameters it *used*, with its ``H`` and ``G``.
    * ``FAIL``/``PRUNED`` rounds without the divergence mark, and rejected
      rounds, are skipped: the next round repeats their hyperparameters.
    * no round yet: ``init``.

    Since ``p_{t+1}`` depends on ``p_t``, ``H_t`` and ``G_t`` only, this equals
    running the EGN recursion over all completed rounds in order. The sampler
    keeps the decision of the trials it has read (finished trials never
    change) and reads only trials that are new or were not finished then.
    Running trials are ignored: FATHOM is sequential, concurrent asks get the
    same suggestion.

    Args:
        init: the first round's hyperparameters, within ``bounds``.
        bounds: the box ``p`` is clipped to.
        config: the hyper learning rates (default :class:`FathomConfig`);
            its ``init``/``bounds`` must be ``None`` or equal to the
            arguments. The sampler reads only ``gamma``; ``alpha`` belongs to
            the loop's :class:`ServerTracker`. ``sampler.config`` holds the
            resolved config.
        seed: seed of the random sampler used for other parameters.

    Example:
        >>> import optuna
        >>> from fathom_tune import Bounds, HParams
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> sampler = FathomSampler(
        ...     init=HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0),
        ...     bounds=Bounds(lower=HParams(1e-3, 0.1, 1.0), upper=HParams(1.0, 10.0, 256.0)),
        ... )
        >>> study = optuna.create_study(sampler=sampler)
        >>> trial = study.ask()
        >>> sampler.suggest(trial)
        HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0)
        >>> report_round(trial, G=1.0, H=0.0)
        >>> _ = study.tell(trial, 2.3)
        >>> round(sampler.suggest(study.ask()).batch_size, 4)  # 20 * exp(-0.1 * 1.0)
        18.0967
    """

    def __init__(
        self,
        *,
        init: HParams,
        bounds: Bounds,
        config: FathomConfig | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(init, HParams):
            raise TypeError(f"FathomSampler: init must be an HParams, got {init!r}")
        if not isinstance(bounds, Bounds):
            raise TypeError(f"FathomSampler: bounds must be a Bounds, got {bounds!r}")
        if config is None:
            config = FathomConfig()
        if not isinstance(config, FathomConfig):
            raise TypeError(f"FathomSampler: config must be a FathomConfig, got {config!r}")
        for name, given, own in (("init", init, config.init), ("bounds", bounds, config.bounds)):
            if own is not None and own != given:
                raise ValueError(
                    f"FathomSampler: config.{name}={own!r} differs from {name}={given!r}; "
                    f"leave config.{name} None or pass the same value"
                )
        bounds.check(init, what="FathomSampler init")
        self._config = dataclasses.replace(config, init=init, bounds=bounds)
        self._independent = RandomSampler(seed=seed)
        # Per study: (trials read, the numbers of those not finished then, the decision
        # of the finished ones, the deciding trial's number).
        self._memo: dict[tuple[int, int], tuple[int, tuple[int, ...], HParams | None, int]] = {}
        self._search_space = log_distributions(bounds)

    @property
    def config(self) -> FathomConfig:
        """The resolved config (``init`` and ``bounds`` filled in)."""
        return self._config

    @property
    def search_space(self) -> dict[str, FloatDistribution]:
        """The three tuned parameters' distributions (log scale, the bounds)."""
        return dict(self._search_space)

    def suggest(self, trial: optuna.Trial) -> HParams:
        """Suggests the round's three hyperparameters on ``trial``."""
        return HParams(
            **{
                n: trial.suggest_float(n, d.low, d.high, log=True)
                for n, d in self._search_space.items()
            }
        )

    def next_hparams(self, study: optuna.Study) -> HParams:
        """The hyperparameters the next round gets, derived from ``study``'s trials.

        Finished trials never change, so the sampler keeps the decision of
        those it has read and reads only the trials added since, and those that
        were not finished then: O(1) trials per round of a sequential loop,
        whoever writes them (another process, ``study.add_trial``).
        """
        storage, study_id = storage_of(study), study_id_of(study)
        key = (id(storage), study_id)
        trials = storage.get_all_trials(study_id, deepcopy=False)  # in number order
        seen, open_, decision, number = self._memo.get(key, (0, (), None, -1))
        if seen > len(trials) or any(trials[n].number != n for n in (0, len(trials) - 1) if trials):
            seen, open_, decision, number = 0, (), None, -1  # not the study it was: read it whole
        fresh = [trials[n] for n in open_] + trials[seen:]
        still_open = tuple(t.number for t in fresh if not t.state.is_finished())
        for trial in sorted((t for t in fresh if t.state in _FINISHED), key=lambda t: t.number, reverse=True):
            if trial.number < number:
                break
            following = self.following(trial)
            if following is not None:
                decision, number = following, trial.number
                break
        self._memo[key] = (len(trials), still_open, decision, number)
        return decision or self._config.init

    def following(self, trial: FrozenTrial) -> HParams | None:
        """The hyperparameters of the round after the finished round ``trial``, or ``None``
        when ``trial`` does not count (see the class docstring) and an earlier round decides.

        Raises:
            ValueError: ``trial`` is a completed round without valid ``G``/``H``.
        """
        if not trial.state.is_finished() or not all(n in trial.params for n in NAMES):
            return None
        used = HParams(**{n: trial.params[n] for n in NAMES})
        told = trial.user_attrs.get(REJECTION)
        if trial.user_attrs.get(REJECTED) and isinstance(told, dict):
            back = None if told.get("back_to") is None else HParams(**told["back_to"])
            return rejected_hparams(used, back, bool(told["reset"]), self._config)
        if trial.user_attrs.get(DIVERGED_ATTR) is True:
            return self.after(used, diverged=True)
        if trial.state != TrialState.COMPLETE or REJECTED_ATTR in trial.system_attrs:
            return None
        problem = _round_problem(trial)
        if problem is not None:
            raise ValueError(
                f"FathomSampler: {problem} It was not told through FathomSampler.after_trial "
                "(added with study.add_trial, or told under another sampler), so the sampler "
                "cannot continue this study; start a new study whose completed rounds carry "
                f"{G_ATTR!r} and {H_ATTR!r}."
            )
        H = _hypergradient_value(trial.user_attrs[H_ATTR])
        G = _hypergradient_value(trial.user_attrs[G_ATTR])
        return self.after(used, G=G, H=H)

    def after(self, used: HParams, *, G: float = 0.0, H: float = 0.0, diverged: bool = False) -> HParams:
        """The hyperparameters of the round after one that ran with ``used``: FATHOM's step
        with its hypergradients ``G`` and ``H`` (recorded values, in [-1, 1]), or, after a
        diverged round, ``used`` with the learning rate times :data:`DIVERGED_LR_FACTOR`.

        :meth:`following` of that round's trial gives the same: both are
        :func:`fathom_tune.fathom.state.next_hparams`, FATHOM's one hyper step.
        """
        return next_hparams(used, H, G, self._config, diverged=diverged)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._search_space)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        wanted = {n: d for n, d in search_space.items() if n in NAMES}
        if not wanted:
            return {}
        hparams = self.next_hparams(study)
        return {n: _fit(n, getattr(hparams, n), d) for n, d in wanted.items()}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # Reached for a tuned name only when the trial's distribution does not
        # contain the relative value (other bounds than the sampler's): the
        # FATHOM value is clipped into the trial's distribution.
        if param_name in NAMES:
            return _fit(
                param_name, getattr(self.next_hparams(study), param_name), param_distribution
            )
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._independent.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._independent.after_trial(study, trial, state, values)
        if state != TrialState.COMPLETE or trial.user_attrs.get(DIVERGED_ATTR) is True:
            return
        present = [n for n in NAMES if n in trial.params]
        if not present:
            return
        if len(present) < len(NAMES):
            problem = (
                f"trial {trial.number} holds {present} but not all of {list(NAMES)}; "
                "FATHOM tunes the three together (use FathomSampler.suggest(trial))."
            )
        else:
            problem = _round_problem(trial)
        if problem is None:
            return
        set_trial_system_attr(study, trial, REJECTED_ATTR, problem)
        raise ValueError(
            f"FathomSampler: {problem} Optuna stores the trial as COMPLETE regardless; "
            f"the sampler marks it {REJECTED_ATTR!r} and skips it, so the next round repeats "
            "its hyperparameters."
        )

    def reseed_rng(self) -> None:
        self._independent.reseed_rng()


def _round_problem(trial: FrozenTrial) -> str | None:
    """What is wrong with a completed round's hypergradients, or ``None``."""
    bad = [
        f"{key}={trial.user_attrs.get(key, '<missing>')!r}"
        for key in (G_ATTR, H_ATTR)
        if _hypergradient_value(trial.user_attrs.get(key)) is None
    ]
    if not bad:
        return None
    return (
        f"round (trial {trial.number}) is COMPLETE without valid hypergradients "
        f"({', '.join(bad)}; each must be a finite number in [-1, 1]). "
        f"Call fathom_tune.report_round(trial, G=..., H=...) before study.tell(trial, ...), "
        f"or report_divergence(trial) for a diverged round."
    )


def _fit(name: str, value: float, distribution: BaseDistribution) -> float:
    if not isinstance(distribution, FloatDistribution) or distribution.step is not None:
        raise ValueError(
            f"FathomSampler samples {name!r} as a real number; suggest it with "
            f"trial.suggest_float({name!r}, low, high, log=True), got {distribution!r}"
        )
    return float(min(max(value, distribution.low), distribution.high))
