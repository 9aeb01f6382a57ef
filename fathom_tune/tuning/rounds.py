"""The round loop's schedule inside the one one-run driver: one trial per round, and the safety net.

:class:`Rounds` wraps a :class:`~fathom_tune.tuning.one_run.OneRunSchedule`
for :func:`fathom_tune.tuning.loop.run`: it judges each round with the run's
:class:`~fathom_tune.tuning.safety.SafetyNet` (:meth:`Rounds.judge`, the loop's
``judge``), tells the schedule (:meth:`~fathom_tune.tuning.one_run.OneRunSchedule.learn`
for an accepted round or one the net is off for,
:meth:`~fathom_tune.tuning.one_run.OneRunSchedule.rejected` for a rejected one),
restarts the kept server state's learned parts after a rejection
(:meth:`~fathom_tune.tuning.one_run.OneRunSchedule.kept_server`), and queues the
round's trial (:func:`fathom_tune.storage.record.round_trial`) for the writer.
"""

from __future__ import annotations

import datetime
import functools
import math
import warnings

from fathom_tune.engine import RoundResult
from fathom_tune.storage import record
from fathom_tune.tuning.loop import Outcome
from fathom_tune.tuning.safety import Rejection, SafetyNet

__all__ = ["Rounds"]


class Rounds:
    """The loop's schedule around a one-run schedule: one trial per round.

    Rounds are queued in ``pending`` until the writer writes a batch
    (:meth:`take`); they become trial templates (:func:`record.round_trial`)
    with the write, on the writer's thread for a persistent storage.

    Args:
        schedule: the tuner's :class:`~fathom_tune.tuning.one_run.OneRunSchedule`.
        distributions: the rounds' params' distributions.
        recorded: the rounds the study finished past the checkpoint (replayed).
        net: the safety net, or ``None`` (rounds are discarded only when not finite).
        rows: the history rows the run resumes after (the net's state is rebuilt from them).
    """

    def __init__(self, schedule, distributions: dict, recorded: dict, net: SafetyNet | None = None, rows=()):
        self.schedule, self.distributions = schedule, distributions
        self.recorded = dict(recorded)
        self.watch = None if net is None else net.watch(rows)
        self.rejection: Rejection | None = None
        self.replayed = None
        self.started = None
        self.pending: list = []

    def take(self):
        """The queued rounds (the queue starts empty again), as a function that makes
        them trials: the writer's thread calls it."""
        taken, self.pending = self.pending, []
        return lambda: [make() for make in taken]

    def propose(self, round_index: int):
        self.replayed = self.recorded.pop(round_index, None)
        if self.replayed is not None:
            return self.schedule.replay(round_index, self.replayed)
        self.started = datetime.datetime.now()
        return self.schedule.propose(round_index)

    def evaluated(self, params) -> None:
        self.schedule.evaluated(params)

    def judge(self, result: RoundResult) -> str | None:
        """Why the net rejects ``result`` (``None``: kept); without a net, ``"non-finite"``
        for a round that is not finite."""
        if self.watch is None:
            self.rejection = None
            return None if result.finite else record.NON_FINITE
        self.rejection = self.watch.judge(result)
        return None if self.rejection is None else self.rejection.reason

    def observe(self, result: RoundResult, metrics, accepted: bool) -> Outcome:
        trial, rejection = self.replayed, self.rejection
        if trial is None:
            if rejection is None:
                attrs = self.schedule.learn(result, accepted)
            else:
                attrs = {**self.schedule.rejected(result, rejection),
                         record.REJECTED: rejection.reason, record.REJECTION: rejection.record()}
            evals = [] if metrics is None else [record.evaluation(1, result.cost.examples, metrics)]
            self.pending.append(functools.partial(
                record.round_trial, round_index=result.round, hparams=result.hparams,
                distributions=self.distributions, value=result.train_loss if accepted else None,
                cost=result.cost, evals=evals, started=self.started, completed=datetime.datetime.now(),
                **{record.LOCAL_STEPS: int(result.local_steps.sum())}, **attrs,
            ))
        else:
            attrs = self.schedule.relearn(trial, result, accepted, rejection)
            if accepted and trial.value is not None and not math.isclose(
                trial.value, result.train_loss, rel_tol=1e-5, abs_tol=1e-7
            ):
                warnings.warn(
                    f"round {result.round} replayed after a resume gave training loss "
                    f"{result.train_loss!r}; the study recorded {trial.value!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.schedule.observed(result, metrics, accepted)
        server = None if rejection is None else functools.partial(self.schedule.kept_server, rejection=rejection)
        diverged = not accepted and (rejection is None or rejection.reason == record.NON_FINITE)
        return Outcome(record={**self.schedule.columns(attrs), "diverged": diverged}, server=server,
                       params=self.schedule.restart_model())
