"""The run of a one-run peer: one FedAvg run on the engine, one trial per round, crash-safe.

A peer is a :class:`PeerSchedule` (it picks each round's hyperparameters,
learns from each round's result and holds state that a checkpoint saves) and
a :class:`OneRunTuner` (its name, settings and engine options). The run is
the project's one round loop (:func:`fathom_tune.loop.run`), recorded through
:mod:`fathom_tune.record` and checkpointed through
:mod:`fathom_tune.storage.checkpoint` as FATHOM's run is: a run cut off mid-way and
run again ends as an uninterrupted run would.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import math

from fathom_tune import checks
from fathom_tune.engine import Engine, RoundResult
from fathom_tune.hparams import ClientHParams, HParams
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import open_storage, record
from fathom_tune.task import Task
from fathom_tune.tuning import driver
from fathom_tune.tuning.loop import Outcome, Progress, run
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult

__all__ = ["FLUSH_SECONDS", "OneRunTuner", "PeerSchedule", "run_peer"]

_log = logging.getLogger(__name__)

FLUSH_SECONDS = driver.FLUSH_SECONDS
"""Rounds are written to the storage in batches, one transaction per batch (then the
checkpoint): after the first round that ends at least this long after the last
write, at the end of the run, and on an interrupt or error
(:class:`fathom_tune.tuning.driver.RoundWriter`)."""


class PeerSchedule(abc.ABC):
    """A one-run tuner's decisions: a :class:`fathom_tune.loop.Schedule` with state.

    The runner asks :meth:`propose` for each round's hyperparameters, passes
    every round's result to :meth:`learn`, and saves :meth:`trees` in the
    run's checkpoint (:meth:`restore` puts them back on resume). Learning must
    be deterministic given the state and the result.
    """

    @abc.abstractmethod
    def propose(self, round_index: int) -> HParams | ClientHParams:
        """The hyperparameters of round ``round_index``."""

    @abc.abstractmethod
    def learn(self, result: RoundResult, accepted: bool) -> dict:
        """Updates the state from a finished round; returns its attributes for the record
        (JSON values; scalars also become history columns)."""

    @abc.abstractmethod
    def returned(self) -> HParams:
        """The hyperparameters the tuner reports at the end of the run."""

    @abc.abstractmethod
    def trees(self) -> dict:
        """The state as named pytrees of arrays (fixed shapes: they are the checkpoint's templates).

        The arrays returned are not changed in place afterwards: a checkpoint
        may be written from them while the next rounds run."""

    @abc.abstractmethod
    def restore(self, trees: dict) -> None:
        """Takes the state from :meth:`trees` of a checkpoint."""


class _Recorded:
    """The loop's schedule around a peer: one trial per round, through the run record.

    Rounds are queued in ``pending`` until the run writes a batch (:meth:`take`);
    they become trial templates (:func:`fathom_tune.record.round_trial`) with the write.
    """

    def __init__(self, study, schedule: PeerSchedule, bounds, recorded):
        self.study = study
        self.schedule = schedule
        self.bounds = bounds
        self.recorded = dict(recorded)
        self.pending: list = []

    def take(self):
        """The queued rounds (the queue starts empty again), as a function that makes
        them trials: the writer's thread calls it."""
        taken, self.pending = self.pending, []
        return lambda: [make() for make in taken]

    def propose(self, round_index: int):
        return self.schedule.propose(round_index)

    def observe(self, result: RoundResult, metrics, accepted: bool) -> Outcome:
        attrs = self.schedule.learn(result, accepted)
        replay = self.recorded.pop(result.round, None)
        if replay is None:
            evals = [] if metrics is None else [record.evaluation(1, result.cost.examples, metrics)]
            self.pending.append(functools.partial(
                record.round_trial,
                round_index=result.round,
                hparams=result.hparams,
                bounds=self.bounds,
                value=result.train_loss if accepted else None,
                cost=result.cost,
                evals=evals,
                **{record.LOCAL_STEPS: int(result.local_steps.sum())},
                **attrs,
            ))
        elif replay.value is not None and not math.isclose(replay.value, result.train_loss, rel_tol=1e-5, abs_tol=1e-7):
            _log.warning(
                "round %d replayed after a resume gave training loss %r; the study recorded %r",
                result.round, result.train_loss, replay.value,
            )
        columns = {k: v for k, v in attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return Outcome(record={**columns, "diverged": not accepted})


def run_peer(
    task: Task,
    schedule_for,
    *,
    tuner: str,
    config: dict,
    seed: int = 0,
    storage=None,
    study_name: str | None = None,
    checkpoint=None,
    num_rounds: int | None = None,
    eval_every: int | None = None,
    progress: bool = False,
    header: dict | None = None,
    **engine_kwargs,
) -> TuningResult:
    """One run of a peer on ``task``, recorded as the study ``<task>/<tuner>/seed<seed>``.

    Args:
        task: the federated task.
        schedule_for: ``engine -> PeerSchedule``, the peer's schedule for this run.
        tuner: the tuner's name (recorded, and in the study and checkpoint names).
        config: the tuner's settings (recorded; a checkpoint must match them).
        seed: the engine's and the schedule's seed.
        storage: ``None``, an Optuna storage, an RDB URL or a journal file path.
        study_name: default ``<task>/<tuner>/seed<seed>``.
        checkpoint: a ``.npz`` path for crash-safe resume (needs a persistent
            storage); written after each batch of rounds reaches the storage
            (see :data:`FLUSH_SECONDS`), continued from when it exists (rounds
            the storage had not received are run again from it).
        num_rounds, eval_every: default: the task's.
        progress: show a progress bar.
        header: extra study attributes (e.g. FedEx's arms).
        **engine_kwargs: passed to :class:`~fathom_tune.engine.Engine`.
    """
    engine = Engine(task, seed=seed, **engine_kwargs)
    num_rounds = checks.positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    if eval_every is not None:
        checks.positive_int("eval_every", eval_every)
    name = study_name or record.study_name(task.name, tuner, seed)
    path = ckpt.check_path(checkpoint)
    if path is not None and storage is None:
        raise ValueError("checkpoint needs a persistent storage (an RDB URL or a journal file path)")
    schedule = schedule_for(engine)
    kind = f"peer:{tuner}"
    fingerprint = ckpt.fingerprint(engine, study=name, num_rounds=num_rounds, eval_every=eval_every, config=config)
    resume = None
    if path is not None and path.exists():
        resume, trees = ckpt.load_run(
            path, kind=kind, fingerprint=fingerprint, state=engine.init(), templates=schedule.trees()
        )
        schedule.restore(trees)
        driver.refuse_orphan_checkpoint(path, storage)
    opened = open_storage(storage)
    with ckpt.exclusive(path) if path is not None else contextlib.nullcontext():
        study, recorded = driver.open_study(
            opened,
            name=name,
            resume=resume,
            path=path,
            task=task,
            tuner=tuner,
            seed=engine.seed,
            num_rounds=num_rounds,
            config=config,
            header=header,
        )
        looped = _Recorded(study, schedule, task.bounds, recorded)

        def save(done: Progress, trees: dict) -> None:
            ckpt.save_run(path, kind=kind, fingerprint=fingerprint, progress=done, trees=trees)

        with driver.RoundWriter(
            study,
            looped,
            None if path is None else save,
            num_rounds=num_rounds,
            flush_seconds=FLUSH_SECONDS,
            extra=schedule.trees,
            label=f"{tuner} {task.name}",
        ) as writer:
            out = run(
                engine,
                looped,
                num_rounds=num_rounds,
                eval_every=eval_every,
                resume=resume,
                on_round=writer.on_round,
                progress=f"{tuner} {task.name}" if progress else False,
            )
        test_metrics = engine.evaluate(out.params, "test")
        hparams = schedule.returned()
        record.write_outcome(study, hparams=hparams, validation=out.final_metrics, test=test_metrics, ledger=out.cost)
    return TuningResult.of_run(out, task, study=study, hparams=hparams, test_metrics=test_metrics)


@dataclasses.dataclass(frozen=True)
class OneRunTuner(Tuner, abc.ABC):
    """A registered one-run peer: one run of ``task.num_rounds`` rounds whatever the budget.

    With a persistent storage and a ``checkpoint_dir`` it is crash-safe and
    re-runnable as :class:`~fathom_tune.fathom.Fathom` is: a finished run is
    read back from the storage, a run cut off mid-way continues from its
    checkpoint, and a partial study without a checkpoint is deleted and run
    again from round 0.
    """

    @abc.abstractmethod
    def schedule_for(self, engine: Engine) -> PeerSchedule:
        """A fresh schedule for a run on ``engine``."""

    @abc.abstractmethod
    def settings(self) -> dict:
        """The tuner's settings (JSON values), recorded and fingerprinted."""

    def engine_options(self, task: Task) -> dict:
        """Options of the run's :class:`~fathom_tune.engine.Engine` on ``task``."""
        return {}

    def header(self, task: Task) -> dict:
        """Extra study attributes."""
        return {}

    def tune(self, request: Request) -> TuningResult:
        name = request.study_name(self.name)
        opened, path, finished = driver.one_run_storage(request, name)
        if finished is not None:
            return finished
        return run_peer(
            request.task,
            self.schedule_for,
            tuner=self.name,
            config=self.settings(),
            seed=request.seed,
            storage=opened,
            study_name=name,
            checkpoint=path,
            progress=request.progress,
            header=self.header(request.task),
            **self.engine_options(request.task),
        )

