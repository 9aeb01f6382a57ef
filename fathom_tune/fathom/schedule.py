"""FATHOM's side of the round loop: each round's hyperparameters, and each round queued as a trial.

:func:`fathom_tune.fathom.optimize` runs :class:`FathomSchedule` in
:func:`fathom_tune.loop.run` and writes what it queues to the study.
"""

from __future__ import annotations

import datetime
import logging
import math
import warnings

from optuna.trial import FrozenTrial, TrialState

from fathom_tune.engine import RoundResult
from fathom_tune.fathom.hypergrad import local_hypergradient
from fathom_tune.fathom.sampler import FathomSampler, report_divergence, report_round
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.storage import record
from fathom_tune.tuning.loop import Outcome

__all__ = ["ROUND_HEADER", "FathomSchedule"]

_rounds_log = logging.getLogger("fathom_tune.rounds")
"""One INFO line per round (a command line turns it on to show the run as it happens)."""

ROUND_HEADER = f"{'round':>5} {'eta':>9} {'E':>8} {'B':>8} {'steps':>6} {'H':>7} {'G':>7} {'loss':>9}  validation"


class FathomSchedule:
    """The loop's schedule: each round's hyperparameters, and each round as a finished trial.

    The hyperparameters come from :meth:`FathomSampler.after` the previous
    round, as the sampler derives them from that round's trial; each round
    is queued in ``pending`` (a :class:`_Round`, the few numbers its trial is
    made of) until the run flushes a batch to the storage, where it becomes
    the trial the sampler's ask-and-tell protocol would write (its three
    parameters, ``G``, ``H``, cost, evaluations; training loss as value,
    ``FAIL`` for a diverged round; :func:`fathom_tune.storage.bulk.add_trials`).
    Building the trials with the write keeps that work off the rounds'
    critical path (on the writer's thread for a persistent storage).

    ``recorded`` maps rounds that the study already finished (a resumed run
    whose checkpoint is older than the study) to their trials: those rounds
    are run again from the checkpoint, deterministically, with the recorded
    hyperparameters, and nothing new is written for them.
    """

    def __init__(self, study, sampler: FathomSampler, recorded=None):
        self.sampler = sampler
        self.recorded = dict(recorded or {})
        self.replay = None
        self.pending: list[_Round] = []
        self.next = sampler.next_hparams(study)
        self.started = None
        self.distributions = sampler.search_space

    def propose(self, round_index: int) -> HParams:
        self.replay = self.recorded.pop(round_index, None)
        if self.replay is not None:
            return HParams(**{n: self.replay.params[n] for n in NAMES})
        self.started = datetime.datetime.now()
        return self.next

    def observe(self, result: RoundResult, metrics, accepted: bool) -> Outcome:
        G = local_hypergradient(result.statistic, result.num_examples)
        # H = cos(m, u) came with the round: the engine's server optimizer is
        # track_agreement(...), whose state holds H and the updated m.
        h = float(result.opt_state.h) if accepted else math.nan
        if self.replay is not None:
            trial = self.replay
            if accepted and not math.isclose(trial.value, result.train_loss, rel_tol=1e-5, abs_tol=1e-7):
                warnings.warn(
                    f"round {result.round} replayed after a resume gave training loss "
                    f"{result.train_loss!r}; the study recorded {trial.value!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.next = self.sampler.following(trial) or self.next
        else:
            done = _Round(result, metrics, accepted, G, h, self.started)
            self.pending.append(done)
            # What the sampler's following() of this round's trial gives, without the trial.
            self.next = self.sampler.after(result.hparams, G=done.G, H=done.H, diverged=not accepted)
        if _rounds_log.isEnabledFor(logging.INFO):
            hp = result.hparams
            shown = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
            _rounds_log.info(
                f"{result.round:5d} {hp.learning_rate:9.4g} {hp.local_epochs:8.4g} {hp.batch_size:8.4g} "
                f"{int(result.local_steps.sum()):6d} {h:7.3f} {G:7.3f} {result.train_loss:9.4g}  {shown}"
            )
        return Outcome(record={"H": h, "G": G, "diverged": not accepted})

    def take(self):
        """The queued rounds (the queue starts empty again), as a function that makes
        them trials: the writer's thread calls it."""
        taken, self.pending = self.pending, []
        distributions = self.distributions
        return lambda: [r.trial(distributions) for r in taken]


class _Round:
    """A finished round as the numbers its trial is made of (:meth:`trial` makes it)."""

    __slots__ = ("accepted", "completed", "cost", "hparams", "loss", "metrics", "reported", "round", "started", "steps")

    def __init__(self, result: RoundResult, metrics, accepted: bool, G: float, h: float, started) -> None:
        self.round, self.hparams, self.cost = int(result.round), result.hparams, result.cost
        self.loss, self.steps = float(result.train_loss), int(result.local_steps.sum())
        self.metrics, self.accepted, self.started = metrics, accepted, started
        self.completed = datetime.datetime.now()
        self.reported = _Attrs()
        if accepted:  # G and H as report_round records them (clamped to [-1, 1])
            report_round(self.reported, G=G, H=h)
        else:
            report_divergence(self.reported)

    @property
    def G(self) -> float | None:
        return self.reported.get(record.FATHOM_G)

    @property
    def H(self) -> float | None:
        return self.reported.get(record.FATHOM_H)

    def trial(self, distributions) -> FrozenTrial:
        """The round as the trial FathomSampler's ask-and-tell protocol records."""
        attrs = _Attrs({record.ROUND: self.round})
        evals = [] if self.metrics is None else [record.evaluation(1, self.cost.examples, self.metrics)]
        record.write_step(attrs, cost=self.cost, evals=evals, **{record.LOCAL_STEPS: self.steps})
        attrs.update(self.reported)
        return FrozenTrial(
            number=0,
            trial_id=0,
            state=TrialState.COMPLETE if self.accepted else TrialState.FAIL,
            value=self.loss if self.accepted else None,
            datetime_start=self.started,
            datetime_complete=self.completed,
            params={n: getattr(self.hparams, n) for n in NAMES},
            distributions=distributions,
            user_attrs=dict(attrs),
            system_attrs={},
            intermediate_values={},
        )


class _Attrs(dict):
    """User attrs gathered for a trial template, through the writers that set them on a trial."""

    def set_user_attr(self, key, value) -> None:
        self[key] = value
