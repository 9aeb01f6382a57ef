"""The one round loop that FATHOM and every baseline run.

A *schedule* picks each round's hyperparameters and sees each round's result;
:func:`run` owns everything else (the engine, evaluation cadence, divergence
handling, the ledger, the history and the progress bar), so the tuners differ
only in who picks the hyperparameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fathom_tune import checks
from fathom_tune.engine import Cost, Engine, RoundResult, ServerState
from fathom_tune.hparams import HParams
from fathom_tune.storage.checkpoint import Progress
from fathom_tune.storage.record import NON_FINITE, REJECTED
from fathom_tune.task import Target

__all__ = [
    "Outcome",
    "Progress",
    "RunResult",
    "Schedule",
    "Static",
    "rounds_to_target",
    "run",
]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a schedule decides after seeing a round.

    Attributes:
        stop: end the run after this round.
        record: extra columns for this round's history row.
        server: ``None``, or a function of the server optimizer state the next
            round would start from, giving the state it starts from instead
            (the safety net restarts a learned server step after a rejection).
        params: ``None``, or the model the next round starts from instead of
            the last accepted one (``fathom-auto`` returns to its best model when
            validation falls).
    """

    stop: bool = False
    record: dict = dataclasses.field(default_factory=dict)
    server: Callable | None = None
    params: object = None


class Schedule(Protocol):
    """Picks the hyperparameters of each round and observes its result."""

    def propose(self, round_index: int) -> HParams:
        """The hyperparameters for round ``round_index`` (0-based)."""

    def observe(self, result: RoundResult, metrics: dict[str, float] | None, accepted: bool) -> Outcome:
        """Sees a finished round.

        Args:
            result: the round's :class:`~fathom_tune.engine.RoundResult`.
            metrics: validation metrics when the round evaluated, else ``None``.
            accepted: ``False`` when the round diverged (non-finite loss or
                update) and its model was discarded.
        """


@dataclasses.dataclass
class Static:
    """FedAvg with fixed hyperparameters; stops at the first divergent round.

    Args:
        hparams: the hyperparameters of every round.
        on_eval: optional callback ``(round_index, metrics) -> bool``; returning
            ``True`` stops the run (e.g. an Optuna pruner said so).
    """

    hparams: HParams
    on_eval: Callable[[int, dict[str, float]], bool] | None = None

    def propose(self, round_index: int) -> HParams:
        return self.hparams

    def observe(self, result, metrics, accepted) -> Outcome:
        if not accepted:
            return Outcome(stop=True, record={"diverged": True})
        if metrics is not None and self.on_eval is not None:
            return Outcome(stop=bool(self.on_eval(result.round, metrics)))
        return Outcome()


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns: one training run, for the tuner that ran it.

    Attributes:
        state: the final server state (the last accepted model).
        history: one row per round (see :func:`run`).
        cost: the run's total cost (every round, discarded ones too).
        final_metrics: validation metrics of the final model.
    """

    state: ServerState
    history: pd.DataFrame
    cost: Cost
    final_metrics: dict[str, float]

    @property
    def params(self):
        return self.state.params


def rounds_to_target(history: pd.DataFrame, target: Target, column: str = "rounds") -> int | None:
    """The cumulative ``column`` (rounds, examples, ...) at the first evaluation meeting ``target``.

    Example:
        >>> h = pd.DataFrame({"rounds": [1, 2, 3], "val_accuracy": [float("nan"), 0.5, 0.9]})
        >>> rounds_to_target(h, Target("accuracy", 0.8))
        3
    """
    col = f"val_{target.metric}"
    if col not in history:
        return None
    for value, spent in zip(history[col], history[column]):
        if not math.isnan(value) and target.reached(float(value)):
            return int(spent)
    return None


def run(
    engine: Engine,
    schedule: Schedule,
    *,
    num_rounds: int | None = None,
    eval_every: int | None = None,
    state: ServerState | None = None,
    progress: bool | str = False,
    resume: Progress | None = None,
    on_round: Callable[[Progress], None] | None = None,
    judge: Callable[[RoundResult], str | None] | None = None,
) -> RunResult:
    """Runs FedAvg rounds with the hyperparameters ``schedule`` picks.

    Every ``eval_every`` rounds, and after the last, the model is evaluated on
    the validation clients. A round whose training loss or update is not
    finite is *discarded*: the model stays at the last accepted state (its
    cost still counts) and the schedule is told ``accepted=False``. With
    ``judge`` (the one-run driver's safety net, :mod:`fathom_tune.tuning.safety`)
    a round is discarded when ``judge(result)`` names a reason.

    The history has one row per round: ``round``, the three hyperparameters,
    ``local_steps`` (sum over clients), ``train_loss``, ``accepted``,
    ``rejected`` (why a discarded round was: ``"non-finite"``, ``"blow-up"``;
    only once a round was discarded),
    the validation metrics as ``val_<name>`` on evaluation rounds (NaN
    elsewhere), the cumulative ``rounds``, ``examples``, ``steps``,
    ``bytes_up``, ``bytes_down``, ``seconds``, and what the schedule adds.

    Args:
        engine: the engine (task, seed, server optimizer).
        schedule: e.g. :class:`Static` or FATHOM's schedule.
        num_rounds: default: the task's ``num_rounds``.
        eval_every: default: the task's ``eval_every``.
        state: start from this state (default: a fresh model).
        progress: show a progress bar; a string is used as its label.
        resume: continue a run that stopped after ``len(resume.rows)`` of its
            ``num_rounds`` rounds (e.g. from a checkpoint); overrides ``state``.
        on_round: called with the run's :class:`Progress` after every round
            (e.g. to write a checkpoint).
        judge: ``judge(result)`` is why the round is discarded, or ``None`` to
            keep it (default: ``"non-finite"`` when the loss or update is not
            finite); called once per round, in order.

    Example:
        >>> import fathom_tune
        >>> from fathom_tune.engine import Engine
        >>> task = fathom_tune.tasks.digits()
        >>> out = run(Engine(task), Static(task.init_hparams), num_rounds=4, eval_every=2)
        >>> list(out.history["rounds"]), out.cost.rounds
        ([1, 2, 3, 4], 4)
    """
    task = engine.task
    num_rounds = checks.positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    eval_every = checks.positive_int("eval_every", task.eval_every if eval_every is None else eval_every)
    if resume is not None:
        state, cost = resume.state, resume.cost
        rows, final_metrics = [dict(r) for r in resume.rows], dict(resume.final_metrics)
    else:
        state = engine.init() if state is None else state
        cost, rows, final_metrics = Cost(), [], {}
    if len(rows) > num_rounds:
        raise ValueError(f"resume holds {len(rows)} rounds, more than num_rounds={num_rounds}")
    bar = tqdm(
        total=num_rounds,
        initial=len(rows),
        desc=progress if isinstance(progress, str) else task.name,
        disable=not progress,
        leave=False,
    )
    with bar:
        for i in range(len(rows), num_rounds):
            hparams = schedule.propose(state.round)
            new_state, result = engine.run_round(state, hparams)
            rejected = (None if result.finite else NON_FINITE) if judge is None else judge(result)
            accepted = rejected is None
            last = i == num_rounds - 1
            metrics = None
            if accepted:
                state = new_state
                if (i + 1) % eval_every == 0 or last:
                    metrics = engine.evaluate(state.params, "validation")
            else:
                state = dataclasses.replace(state, round=state.round + 1)
            if metrics is not None and hasattr(schedule, "evaluated"):
                schedule.evaluated(state.params)  # the model its metrics are of
            outcome = schedule.observe(result, metrics, accepted)
            if outcome.server is not None:
                state = dataclasses.replace(state, opt_state=outcome.server(state.opt_state))
            if outcome.params is not None:
                state = dataclasses.replace(state, params=outcome.params)
            cost = cost + result.cost
            extra = outcome.record if accepted else {REJECTED: rejected, **outcome.record}
            rows.append(_row(result, metrics, accepted, cost, extra))
            if metrics is not None:
                final_metrics = metrics
                bar.set_postfix({task.target.metric: f"{metrics.get(task.target.metric, math.nan):.4f}"})
            bar.update(1)
            if on_round is not None:
                on_round(Progress(state, _Prefix(rows, len(rows)), cost, final_metrics))
            if outcome.stop:
                break
    if f"val_{task.target.metric}" not in rows[-1]:  # stopped early or diverged last
        final_metrics = engine.evaluate(state.params, "validation")
        # a new dict: rows handed to on_round (maybe still being written) stay as they were
        rows[-1] = {**rows[-1], **{f"val_{k}": v for k, v in final_metrics.items()}}
    history = pd.DataFrame(rows)
    return RunResult(state=state, history=history, cost=cost, final_metrics=final_metrics)


class _Prefix(Sequence):
    """The first ``n`` rows of the run's growing row list, without copying them: the
    loop only appends, so the view stays what it was (O(1) per round, not O(rounds))."""

    __slots__ = ("_n", "_rows")

    def __init__(self, rows: list, n: int) -> None:
        self._rows, self._n = rows, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._rows[: self._n][index]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return self._rows[index % self._n]


def _row(result: RoundResult, metrics, accepted: bool, cost: Cost, extra: dict) -> dict:
    row = {
        "round": result.round,
        **result.hparams.as_dict(),
        "local_steps": int(np.sum(result.local_steps)),
        "train_loss": result.train_loss,
        "accepted": accepted,
    }
    if metrics is not None:
        row.update({f"val_{k}": v for k, v in metrics.items()})
    row.update(cost.as_dict())
    row.update(extra)
    return row
