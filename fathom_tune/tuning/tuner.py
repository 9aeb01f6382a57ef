"""One tuner interface and one result type.

A *tuner* picks FedAvg's client hyperparameters on a task and records its
run in an Optuna study through :mod:`fathom_tune.record`. FATHOM
(:class:`fathom_tune.fathom.Fathom`), every search baseline
(:class:`baselines.Baseline`) and any tuner a user writes subclass
:class:`Tuner` (a ``name`` and a :meth:`Tuner.tune`) and return a
:class:`TuningResult`; :mod:`fathom_tune.tuning.registry` finds one by name.
For example, a TPE search with successive halving after every evaluation::

    import baselines, fathom_tune
    fathom_tune.tuners.register(baselines.Baseline("tpe+sha1", baselines.TPE(),
                                baselines.SuccessiveHalving(reduction_factor=2)))
"""

from __future__ import annotations

import abc
import dataclasses
import pathlib
import time
from typing import Any

import optuna
import pandas as pd

from fathom_tune import checks
from fathom_tune.engine import Cost, Engine
from fathom_tune.engine.timing import compile_seconds
from fathom_tune.hparams import HParams
from fathom_tune.storage import open_storage, record
from fathom_tune.storage.reader import RunRecord
from fathom_tune.storage.record import study_name
from fathom_tune.task import Target, Task
from fathom_tune.tuning.loop import Static, rounds_to_target, run

__all__ = ["Request", "Tuner", "TuningResult", "fedavg", "result_from_record"]


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """What every tuner returns; the same fields, names and kinds for all of them.

    Attributes:
        study: the Optuna study the tuner recorded its run in (``None`` for
            :func:`fedavg`, which tunes nothing).
        history: one row per step: per round for tuners that adapt during one
            run (and for :func:`fedavg`), per trial for search baselines.
        hparams: the hyperparameters the tuner returns (FATHOM: those it would
            use next; a search: its chosen trial's), or None.
        params: the returned model's parameters (None when not available,
            e.g. a resumed search whose chosen trial ran in another process
            without a checkpoint).
        cost: everything the tuner spent (all rounds, all trials).
        rounds_to_target: communication rounds the whole tuning spent until a
            model first met the task's target on validation, or None.
        examples_to_target: the same in client examples, or None.
        validation_metrics: validation metrics of the returned model.
        test_metrics: test metrics of the returned model (never used to tune).
        target: the task's target.
    """

    study: optuna.Study | None
    history: pd.DataFrame
    hparams: HParams | None
    params: Any
    cost: Cost
    rounds_to_target: int | None
    examples_to_target: int | None
    validation_metrics: dict[str, float]
    test_metrics: dict[str, float]
    target: Target

    @classmethod
    def of_run(cls, out, task: Task, *, study, hparams, test_metrics, history=None) -> TuningResult:
        """The result of one run (:func:`fathom_tune.loop.run`'s output ``out``) on
        ``task``; ``history`` replaces ``out.history`` (e.g. with columns reordered)."""
        history = out.history if history is None else history
        return cls(
            study=study,
            history=history,
            hparams=hparams,
            params=out.params,
            cost=out.cost,
            rounds_to_target=rounds_to_target(history, task.target),
            examples_to_target=rounds_to_target(history, task.target, column="examples"),
            validation_metrics=out.final_metrics,
            test_metrics=test_metrics,
            target=task.target,
        )


def _recorded(request: Request, tuner: str) -> optuna.Study | None:
    """The tuner's study in a persistent storage, if it exists (after an interrupt)."""
    if request.storage is None:
        return None
    try:
        return optuna.load_study(study_name=request.study_name(tuner), storage=open_storage(request.storage))
    except (KeyError, ValueError, TypeError):
        return None


def result_from_record(run: RunRecord, params=None) -> TuningResult:
    """The :class:`TuningResult` of a recorded run, read from the storage alone.

    ``history`` is the record's per-step table (:attr:`RunRecord.steps`);
    ``params`` is whatever the caller has (the storage holds no model).
    """
    rounds, examples = run.cost_to_target()
    return TuningResult(
        study=run.study,
        history=run.steps,
        hparams=run.hparams,
        params=params,
        cost=run.ledger,
        rounds_to_target=rounds,
        examples_to_target=examples,
        validation_metrics=dict(run.validation),
        test_metrics=dict(run.test),
        target=run.target,
    )


@dataclasses.dataclass(frozen=True)
class Request:
    """One call of :meth:`Tuner.run`, checked: what a tuner's :meth:`Tuner.tune` gets.

    Attributes:
        task: the federated task.
        budget_rounds: the tuning budget in communication rounds, or None.
        seed: the engine's and the tuner's seed.
        storage: the storage as given (open it with :func:`fathom_tune.open_storage`).
        checkpoint_dir: an existing directory for crash-safe runs, or None.
        progress: show progress bars.
    """

    task: Task
    budget_rounds: int | None
    seed: int
    storage: Any
    checkpoint_dir: pathlib.Path | None
    progress: bool

    def study_name(self, tuner: str) -> str:
        """``<task>/<tuner>/seed<k>``."""
        return study_name(self.task.name, tuner, self.seed)


class Tuner(abc.ABC):
    """Picks a task's hyperparameters within a budget and records the run.

    Subclasses set :attr:`name` and implement :meth:`tune`; :meth:`run` is
    the one public entry point, the same for every tuner.

    Attributes:
        name: the registry name; studies are named ``<task>/<name>/seed<k>``
            (no ``/`` in it).
    """

    name: str

    def run(
        self,
        task: Task,
        *,
        budget_rounds: int | None = None,
        seed: int = 0,
        storage=None,
        checkpoint_dir=None,
        progress: bool = False,
    ) -> TuningResult:
        """Tunes ``task`` and returns the :class:`TuningResult`.

        Args:
            task: the federated task.
            budget_rounds: the tuning budget in communication rounds, summed
                over everything the tuner trains (``None``: the tuner's
                default; a one-run tuner spends one run of ``task.num_rounds``).
            seed: the engine's and the tuner's seed.
            storage: ``None`` (in memory), an Optuna storage, an RDB URL or a
                journal file path; the study ``<task>/<name>/seed<seed>``
                there is created or, when it exists, continued.
            checkpoint_dir: an existing directory for crash-safe runs; a
                re-run after a crash continues from it and ends as an
                uninterrupted run would.
            progress: show progress bars.

        Raises:
            TypeError, ValueError: a bad argument, before anything is written.
        """
        if not isinstance(task, Task):
            raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
        if budget_rounds is not None:
            budget_rounds = checks.positive_int("budget_rounds", budget_rounds)
        if checkpoint_dir is not None:
            checkpoint_dir = pathlib.Path(checkpoint_dir)
            if not checkpoint_dir.is_dir():
                raise ValueError(f"checkpoint_dir={str(checkpoint_dir)!r} is not an existing directory")
        request = Request(
            task=task,
            budget_rounds=budget_rounds,
            seed=checks.seed("seed", seed),
            storage=storage,
            checkpoint_dir=checkpoint_dir,
            progress=checks.boolean("progress", progress),
        )
        start, compiled = time.perf_counter(), compile_seconds()
        result = None
        try:
            result = self.tune(request)
            return result
        finally:  # also when interrupted: the time spent is part of the run's cost
            study = result.study if result is not None else _recorded(request, self.name)
            if study is not None:
                record.add_wall_time(
                    study,
                    seconds=time.perf_counter() - start,
                    compile_seconds=compile_seconds() - compiled,
                )

    @abc.abstractmethod
    def tune(self, request: Request) -> TuningResult:
        """Runs the tuner for a checked :class:`Request`."""


def fedavg(
    task: Task,
    hparams: HParams | None = None,
    *,
    seed: int = 0,
    num_rounds: int | None = None,
    eval_every: int | None = None,
    progress: bool | str = False,
    **engine_kwargs,
) -> TuningResult:
    """Static FedAvg on ``task`` (default: the task's initial hyperparameters), untuned.

    The same :class:`TuningResult` as every tuner, with ``study=None`` and
    one history row per round.

    Example:
        >>> import fathom_tune
        >>> out = fedavg(fathom_tune.tasks.digits(), num_rounds=3)
        >>> out.cost.rounds, sorted(out.test_metrics)
        (3, ['accuracy', 'loss'])
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
    hparams = task.init_hparams if hparams is None else hparams
    if not isinstance(hparams, HParams):
        raise TypeError(f"hparams must be an HParams, got {hparams!r}")
    engine = Engine(task, seed=seed, **engine_kwargs)
    out = run(engine, Static(hparams), num_rounds=num_rounds, eval_every=eval_every, progress=progress)
    return TuningResult.of_run(
        out, task, study=None, hparams=hparams, test_metrics=engine.evaluate(out.params, "test")
    )
