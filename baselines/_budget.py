"""The tuning budget of a baseline study, read from the storage each time.

See :mod:`baselines._run` for the rule and its guarantee with any number of
workers on one storage, including killed workers whose trials are retried.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from baselines._objective import cheapest_examples, costliest_examples, origin, projected_cost
from fathom_tune import record
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.storage.optuna_internals import retries_stale_trials, trial_system_attrs
from fathom_tune.task import Task

__all__ = ["RETRY_WAIT", "Budget", "NotRun"]

RETRY_WAIT = 60.0
"""Seconds a trial failed as stale keeps its reservation while its retry is not there."""


def _awaiting_retry(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that look stale-failed and whose retry does not exist yet.

    A stale trial failed by Optuna's heartbeat has no recorded cost and no
    ``not_run`` mark and is not itself a retry (one retry per trial).
    """
    retried = {origin(t) for t in trials if origin(t) != t.number}
    now = datetime.datetime.now()
    return {
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and origin(t) == t.number
        and t.number not in retried
        and record.NOT_RUN not in t.user_attrs
        and record.step_cost(t).rounds == 0
        and t.datetime_complete is not None
        and (now - t.datetime_complete).total_seconds() < RETRY_WAIT
    }


class NotRun(Exception):
    """A trial that the budget (or an exhausted grid) does not admit."""


class Budget:
    """The budget rule of the module docstring, read from the storage each time."""

    def __init__(
        self,
        task: Task,
        space: Bounds,
        *,
        seed: int,
        rounds: int,
        examples: int | None,
        max_trials: int | None,
    ):
        self.task = task
        self.seed = seed
        self.rounds = rounds
        self.examples = examples
        self.max_trials = max_trials
        self.limits = {"rounds": rounds, "examples": examples}
        if examples is not None:
            self.cheapest = cheapest_examples(task, space, seed=seed)
            self.costliest = costliest_examples(task, task.bounds, seed=seed)

    def committed(
        self, trials: Sequence[FrozenTrial], below: int | None = None, retrying: bool = False
    ) -> tuple[int, int]:
        """Rounds and examples of finished trials plus full reservations of running ones.

        With ``retrying`` (the storage retries stale trials), a stale-failed
        trial whose retry is not there yet still counts as running.
        """
        rounds = examples = 0
        waiting_for_retry = _awaiting_retry(trials) if retrying else set()
        for t in trials:
            if t.state.is_finished() and t.number not in waiting_for_retry:
                c = record.step_cost(t)
                rounds, examples = rounds + c.rounds, examples + c.examples
            elif below is None or t.number < below:
                rounds += t.user_attrs.get(record.RESERVED_ROUNDS, self.task.num_rounds)
                if self.examples is not None:
                    examples += t.user_attrs.get(record.RESERVED_EXAMPLES, self.costliest)
        return rounds, examples

    def stop_reason(self, study: optuna.Study) -> str | None:
        """Why no further trial may start, or None."""
        with warnings.catch_warnings():  # a deliberate use, not news for every trial
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # no-op without an RDB heartbeat
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return None  # a retry, already reserved
        if self.max_trials is not None and len(trials) >= self.max_trials:
            return f"the grid's {self.max_trials} configurations have all been started"
        if any(t.user_attrs.get(record.NOT_RUN, {}).get("budget") == self.limits for t in trials):
            return "a trial was already refused under this budget"
        rounds, examples = self.committed(trials, retrying=retries_stale_trials(study))
        if rounds + self.task.num_rounds > self.rounds:
            return (
                f"{self.rounds - rounds} of budget_rounds={self.rounds} left, "
                f"one trial needs {self.task.num_rounds}"
            )
        if self.examples is not None and examples + self.cheapest > self.examples:
            return (
                f"{self.examples - examples} of budget_examples={self.examples} left, "
                f"the cheapest trial needs {self.cheapest}"
            )
        return None

    def admit(self, trial: optuna.Trial, hparams: HParams) -> None:
        """Reserves ``trial``'s full cost, or finishes it unrun (raises :class:`NotRun`)."""
        need = projected_cost(self.task, hparams, seed=self.seed)
        trial.set_user_attr(record.RESERVED_ROUNDS, need.rounds)
        if self.examples is not None:
            trial.set_user_attr(record.RESERVED_EXAMPLES, need.examples)
        trials = trial.study.get_trials(deepcopy=False)
        rounds, examples = self.committed(
            trials, below=trial.number, retrying=retries_stale_trials(trial.study)
        )
        reason = None
        retry = "retry_history" in trial_system_attrs(trial)
        if self.max_trials is not None and trial.number >= self.max_trials and not retry:
            reason = f"the grid's {self.max_trials} configurations have all been started"
        elif rounds + need.rounds > self.rounds:
            reason = (
                f"needs {need.rounds} rounds, {self.rounds - rounds} of "
                f"budget_rounds={self.rounds} left"
            )
        elif self.examples is not None and examples + need.examples > self.examples:
            reason = (
                f"needs {need.examples} client examples, {self.examples - examples} of "
                f"budget_examples={self.examples} left"
            )
        if reason is not None:
            trial.set_user_attr(record.NOT_RUN, {"reason": reason, "budget": self.limits})
            raise NotRun(f"trial {trial.number} not run: {reason}")


