"""What every one-run tuner's run shares: its study, its resume, and its rounds written in batches.

FATHOM (:func:`fathom_tune.optimize`), fathom+server and the one-run peers
(:func:`fathom_tune.peers.run_peer`) record one trial per communication round
and checkpoint the run; :class:`fathom_tune.tuning.one_run.OneRun` runs each of
them. It opens the study with :func:`open_study` (which settles a resumed
study with :func:`settle`, as the Flower strategy does too) and writes through
one :class:`RoundWriter`, so a batch, a checkpoint and an interrupted run are
handled one way:

* the queued rounds go to the storage in one transaction
  (:func:`fathom_tune.storage.bulk.add_trials`), then the checkpoint is written:
  the checkpoint is never ahead of the storage, and a study ahead of its
  checkpoint is replayed on resume;
* a batch is written after the first round that ends at least
  ``flush_seconds`` after the last write, every ``every`` rounds, after the
  last round, and on an interrupt or error;
* on a persistent storage the writes run on one background thread, so a
  commit's or an ``fsync``'s wait overlaps the next rounds' training;
* after a failed write no later checkpoint is written (its rounds are lost,
  and a checkpoint past them would skip them on resume).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Self

import optuna
from optuna.storages import InMemoryStorage
from optuna.trial import FrozenTrial, TrialState

from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import open_storage, record
from fathom_tune.storage.bulk import add_trials, set_study_attrs
from fathom_tune.storage.optuna_internals import storage_of
from fathom_tune.storage.reader import read_run
from fathom_tune.task import Task
from fathom_tune.tuning.loop import Progress
from fathom_tune.tuning.tuner import Request, result_from_record

__all__ = [
    "FLUSH_SECONDS",
    "RoundWriter",
    "Writes",
    "one_run_storage",
    "open_study",
    "refuse_held",
    "refuse_orphan_checkpoint",
    "settle",
]

FLUSH_SECONDS = 1.0
"""Default seconds between two batches of rounds written to the storage."""

_log = logging.getLogger(__name__)


def refuse_orphan_checkpoint(path: pathlib.Path, storage) -> None:
    """Refuses to resume from ``path`` when ``storage`` is a SQLite URL whose file is gone
    (before anything creates it anew).

    Raises:
        fathom_tune.CheckpointError: the SQLite file does not exist.
    """
    sqlite = "sqlite:///"
    if isinstance(storage, str) and storage.startswith(sqlite) and not pathlib.Path(storage[len(sqlite) :]).is_file():
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} exists but storage={storage!r} does not: "
            "resume with the storage the run was started with"
        )


def refuse_held(name: str, held: int) -> None:
    """Refuses a fresh run (no checkpoint) on the study ``name`` that holds ``held`` rounds.

    Raises:
        ValueError: ``held`` is not 0.
    """
    if held:
        raise ValueError(
            f"study_name={name!r} already holds {held} rounds in this storage; a run "
            "cannot continue without its model: choose another study_name or storage, or pass "
            "the checkpoint= of the run that wrote it"
        )


def settle(study: optuna.Study, done: int, path, told: Callable[[FrozenTrial], bool] | None = None) -> dict:
    """Settles the study of a run resumed from a checkpoint at round ``done``; returns the
    rounds it finished, ``round -> trial`` (:func:`fathom_tune.storage.record.finished_rounds`).

    Each round left RUNNING is failed and marked stale (the caller holds the
    checkpoint's lock, so no other process is running it; the resumed run
    does that round again), unless ``told(trial)`` settles it and returns True.

    Raises:
        fathom_tune.CheckpointError: a round before ``done`` is missing.
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if told is None or not told(trial):
            record.mark_stale(study, trial)
    return record.finished_rounds(study, done, path)


def open_study(
    opened,
    *,
    name: str,
    resume: Progress | None,
    path: pathlib.Path | None,
    task: Task,
    tuner: str,
    seed: int,
    num_rounds: int,
    config: dict,
    sampler: optuna.samplers.BaseSampler | None = None,
    header: dict | None = None,
) -> tuple[optuna.Study, dict]:
    """Opens (or creates) the run's study and writes its header.

    Returns the study and the rounds it finished past the checkpoint
    (``round -> trial``): a resumed run runs them again from the checkpoint
    and writes nothing new for them (:func:`settle`).

    Raises:
        ValueError: a fresh run (``resume=None``) on a study that holds rounds.
        fathom_tune.CheckpointError: a checkpoint without its study, or one
            whose earlier rounds the study lacks.
    """
    existing = {}
    if opened is not None:
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(opened)}
    if resume is None:
        refuse_held(name, existing.get(name, 0))
    if resume is not None and name not in existing:
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} is at round {resume.state.round} but the storage holds no "
            f"study {name!r}; resume with the storage the run was started with"
        )
    study = optuna.create_study(
        storage=opened, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True
    )
    record.write_header(
        study,
        task=task.name,
        tuner=tuner,
        seed=seed,
        unit="round",
        target=task.target,
        rounds_per_run=num_rounds,
        budget_rounds=num_rounds,
        config=config,
        objective="train_loss",  # each round's trial holds its training loss
    )
    if header:
        set_study_attrs(study, {k: v for k, v in header.items() if study.user_attrs.get(k) != v})
    if resume is None:
        return study, {}
    done = len(resume.rows)
    return study, {r: t for r, t in settle(study, done, path).items() if r >= done}


class Writes:
    """Runs write jobs in order, on one background thread or inline.

    Storage commits and ``fsync`` wait on the disk with Python's GIL
    released, so on a thread they overlap the training of the next rounds.
    At most one job runs at a time; :meth:`busy` tells the caller to keep
    queueing until it is done. A job's exception is raised in the caller at
    the next :meth:`submit`, :meth:`busy` or :meth:`drain`.

    Args:
        threaded: ``False`` runs each job inline in :meth:`submit` (for an
            in-memory storage, whose writes are pure Python and gain nothing
            from a thread).
    """

    def __init__(self, threaded: bool) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "fathom_tune-writes") if threaded else None
        self._job: concurrent.futures.Future | None = None

    def busy(self) -> bool:
        """Whether the last job is still running (re-raises its error once it failed)."""
        if self._job is None:
            return False
        if not self._job.done():
            return True
        job, self._job = self._job, None
        job.result()
        return False

    def submit(self, job) -> None:
        """Runs ``job()`` after the previous job (waiting for it to finish first)."""
        self.drain()
        if self._pool is None:
            job()
        else:
            self._job = self._pool.submit(job)

    def drain(self) -> None:
        """Waits for the running job; raises its error."""
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def close(self) -> None:
        """Waits for the running job (without raising) and stops the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class RoundWriter:
    """Writes a run's queued rounds to its study in batches, each followed by the checkpoint.

    Used as a context manager around :func:`fathom_tune.loop.run`, with
    :meth:`on_round` as its ``on_round``: leaving it normally writes what is
    still queued and waits for the writes; leaving it on an exception (an
    interrupt, a kill signal turned exception, an error) writes the queued
    rounds and the last checkpoint unless a write already failed.

    Args:
        study: the run's study.
        queue: the run's schedule: ``pending`` (the queued rounds) and
            ``take()``, which empties the queue and returns a function that
            makes the taken rounds trial templates (called with the write,
            on the writer's thread for a persistent storage).
        save: ``(progress, extra) -> None`` writes the checkpoint of the
            run at ``progress``; ``None`` without a checkpoint.
        num_rounds: the run's last round is always written at once.
        flush_seconds: see :func:`fathom_tune.optimize`.
        every: also write every this many rounds (``None``: only as
            ``flush_seconds`` says).
        extra: ``() -> object`` taken after every round and passed to
            ``save`` with that round's progress (a schedule's state, which
            may run ahead of the last finished round when an interrupt comes).
        label: names the run in the log.
    """

    def __init__(
        self,
        study: optuna.Study,
        queue,
        save: Callable[[Progress, object], None] | None,
        *,
        num_rounds: int,
        flush_seconds: float,
        every: int | None = None,
        extra: Callable[[], object] | None = None,
        label: str = "",
    ) -> None:
        self.study, self.queue, self.save = study, queue, save
        self.num_rounds, self.flush_seconds, self.every = num_rounds, flush_seconds, every
        self.extra, self.label = extra, label
        self._writes = Writes(threaded=save is not None or not isinstance(storage_of(study), InMemoryStorage))
        self._last = time.monotonic()
        self._done: tuple[Progress, object] | None = None
        self._saved = -1  # rounds in the last checkpoint written
        self._failed = False

    def on_round(self, done: Progress) -> None:
        """Keeps ``done`` as the latest progress; writes a batch when one is due."""
        self._done = (done, None if self.extra is None else self.extra())
        rounds = len(done.rows)
        due = rounds == self.num_rounds or (self.every is not None and rounds % self.every == 0)
        if not due and time.monotonic() - self._last >= self.flush_seconds:
            # a batch is due by the clock; while the last is still being written the
            # rounds keep queueing (flush_seconds=0 writes every round, waiting for it)
            due = self.flush_seconds == 0 or not self._writes.busy()
        if due:
            self._write()

    def _unsaved(self) -> bool:
        return self.save is not None and self._done is not None and len(self._done[0].rows) != self._saved

    def _job(self):
        """The write of what is queued now, and of the checkpoint at the latest progress."""
        trials = self.queue.take()
        done = self._done
        if done is not None and self._unsaved():  # the rows as they are now, for the writer's thread
            done = (dataclasses.replace(done[0], rows=tuple(done[0].rows)), done[1])
        else:
            done = None

        def job() -> None:
            try:
                made = trials()
                if made:
                    add_trials(self.study, made)
                if done is not None:
                    self.save(*done)
                    self._saved = len(done[0].rows)
            except BaseException:
                self._failed = True  # its rounds are lost: no later checkpoint may pass them
                raise

        return job

    def _write(self) -> None:
        self._writes.drain()  # the last write's outcome first: what is saved, whether it failed
        self._writes.submit(self._job())
        self._last = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self._writes.drain()
                if self.queue.pending or self._unsaved():
                    self._write()
                    self._writes.drain()
                return
            try:
                self._writes.drain()
                if not self._failed:
                    self._job()()
            except Exception:  # noqa: BLE001 - the original exception is the one to see
                _log.exception("%s: could not write the rounds queued at the interrupt", self.label)
        finally:
            self._writes.close()


def one_run_storage(request: Request, name: str):
    """Storage and checkpoint of a one-run tuner's study ``name`` (one trial per round).

    Returns ``(opened storage, checkpoint path or None, finished result or None)``.
    With a checkpoint directory: a study already finished is read back as the
    result; a study holding rounds without its checkpoint (its model is lost)
    is deleted and run again; a checkpoint whose study is gone is removed.
    """
    path = None
    if request.checkpoint_dir is not None:
        path = request.checkpoint_dir / (name.replace("/", "-") + ".npz")
    opened = open_storage(request.storage)
    if opened is not None and path is not None:
        held = {s.study_name: s for s in optuna.get_all_study_summaries(opened)}.get(name)
        if held is not None and not path.exists():
            if record.LEDGER in held.user_attrs:  # finished: its record is the result
                _log.info("%s: complete, read from the storage", name)
                study = optuna.load_study(study_name=name, storage=opened)
                return opened, path, result_from_record(read_run(study))
            optuna.delete_study(study_name=name, storage=opened)
            _log.warning("%s: held %d rounds and no checkpoint; deleted and run again", name, held.n_trials)
        elif held is None and path.exists():
            ckpt.remove(path)  # its study is gone; start over
    return opened, path, None
