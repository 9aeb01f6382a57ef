"""The one one-run driver: FATHOM, fathom+server, FedEx and FedHyper all run on it.

A one-run tuner is a :class:`OneRunSchedule` (it picks each round's
hyperparameters, learns from each round's result, and holds state that the
checkpoint saves) run by :class:`OneRun`: the project's one round loop
(:func:`fathom_tune.loop.run`), one trial per round through
:func:`fathom_tune.storage.record.round_trial`, written in batches by
:class:`~fathom_tune.tuning.driver.RoundWriter`, checkpointed with
:func:`fathom_tune.storage.checkpoint.save_run` under the tuner's checkpoint
kind, resumed from the checkpoint (rounds the storage holds past it are run
again and not written twice), then evaluated on the test clients and its
outcome recorded. A run cut off mid-way and run again ends as an
uninterrupted run would. :func:`fathom_tune.optimize` (FATHOM's
:class:`~fathom_tune.fathom.schedule.FathomSchedule`) and
:func:`run_schedule` (a :class:`OneRunTuner`'s schedule: FedEx, FedHyper)
build the run; :func:`run_one` runs it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import pathlib

from fathom_tune import checks
from fathom_tune.engine import Engine, RoundResult, ServerState
from fathom_tune.hparams import ClientHParams, HParams
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import open_storage, record
from fathom_tune.task import Task
from fathom_tune.tuning import driver
from fathom_tune.tuning.loop import Progress, run
from fathom_tune.tuning.rounds import Rounds
from fathom_tune.tuning.safety import Rejection, SafetyNet, restart_server
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult

__all__ = ["DEFAULT_NET", "FLUSH_SECONDS", "OneRun", "OneRunSchedule", "OneRunTuner", "checked_path", "run_one", "run_schedule"]

FLUSH_SECONDS = driver.FLUSH_SECONDS
"""Seconds between two batches of a :class:`OneRunTuner`'s rounds written to the storage
(each batch one transaction, then the checkpoint; see
:class:`fathom_tune.tuning.driver.RoundWriter`)."""


DEFAULT_NET = SafetyNet()
"""The safety net every one-run tuner runs with unless told ``safety_net=None``."""


class OneRunSchedule(abc.ABC):
    """A one-run tuner's decisions: a :class:`fathom_tune.loop.Schedule` with state.

    The driver asks :meth:`propose` for each round's hyperparameters, passes
    every round's result to :meth:`learn`, and saves :meth:`trees` in the
    run's checkpoint (:meth:`restore` puts them back on resume). Learning must
    be deterministic given the state and the result. The other methods have
    defaults that suit a schedule whose whole state is :meth:`trees`.

    Attributes:
        sampler: the study's Optuna sampler (FATHOM: its
            :class:`~fathom_tune.FathomSampler`); ``None``: Optuna's default.
    """

    sampler = None

    @abc.abstractmethod
    def propose(self, round_index: int) -> HParams | ClientHParams:
        """The hyperparameters of round ``round_index``."""

    @abc.abstractmethod
    def learn(self, result: RoundResult, accepted: bool) -> dict:
        """Updates the state from a finished round; returns its attributes for the record
        (JSON values; scalars also become history columns, see :meth:`columns`)."""

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

    def opened(self, study) -> None:
        """Sees the run's study once it is open, before the first round."""

    def replay(self, round_index: int, trial) -> HParams | ClientHParams:
        """The hyperparameters of a round the study finished past the checkpoint (``trial``),
        run again after a resume; default :meth:`propose`."""
        return self.propose(round_index)

    def relearn(self, trial, result: RoundResult, accepted: bool, rejection: Rejection | None = None) -> dict:
        """:meth:`learn` (:meth:`rejected` when ``rejection`` is given) for a replayed round
        whose trial the study holds; nothing is written for it."""
        return self.learn(result, accepted) if rejection is None else self.rejected(result, rejection)

    def rejected(self, result: RoundResult, rejection: Rejection) -> dict:
        """Backs off after a round the safety net rejected (its model is dropped); returns its
        attributes for the record, as :meth:`learn` does. The driver adds
        :data:`~fathom_tune.storage.record.REJECTED` and
        :data:`~fathom_tune.storage.record.REJECTION`. Default: ``learn(result, False)``,
        the schedule's own back-off after a diverged round."""
        return self.learn(result, False)

    def kept_server(self, opt_state, rejection: Rejection):
        """The server optimizer state the round after a rejected one starts from, given the
        last accepted round's ``opt_state``; default :func:`~fathom_tune.tuning.safety.restart_server`
        (a learned server step, such as FedHyper's factor, starts over)."""
        return restart_server(opt_state)

    def observed(self, result: RoundResult, metrics: dict | None, accepted: bool) -> None:
        """Sees a round once it is learnt, with its validation ``metrics`` (or ``None``)."""

    def evaluated(self, params) -> None:
        """Sees the model of a round that evaluated, before :meth:`observed` gets its metrics."""

    def restart_model(self):
        """Asked after :meth:`observed`: a model (params) the next round starts from instead of
        the last accepted one, or ``None`` (default: continue)."""
        return

    def columns(self, attrs: dict) -> dict:
        """The history columns of a round whose attributes are ``attrs``: its scalars."""
        return {k: v for k, v in attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def history(self, frame):
        """The run's history as the tuner returns it (default: the loop's)."""
        return frame

    def search_space(self, task: Task) -> dict:
        """The distributions of the rounds' params (default: log scale over the task's bounds)."""
        return record.log_distributions(task.bounds)

    def stored(self, state: ServerState) -> tuple[ServerState, dict]:
        """The server state as the checkpoint holds it, and trees saved beside it
        (default: as it is, nothing beside)."""
        return state, {}

    def unstored(self, fresh: ServerState, state: ServerState, trees: dict) -> ServerState:
        """The server state from its :meth:`stored` form (``fresh``: a new one)."""
        return state


@dataclasses.dataclass
class OneRun:
    """One one-run tuner's run: its fixed parts, and the steps that use the storage.

    ``kind`` is the checkpoint kind (``"fathom"``, ``"peer:<tuner>"``);
    ``config`` the tuner's settings recorded in the study, ``fingerprinted``
    those a checkpoint must match; ``path`` the checkpoint or ``None``;
    ``every``/``flush_seconds`` when batches are written (see
    :func:`fathom_tune.optimize`); ``header`` extra study attributes; ``label``
    names the run in the log (``log``: where it says it started or resumed),
    ``bar`` its progress bar.
    """

    task: Task
    engine: Engine
    schedule: OneRunSchedule
    tuner: str
    name: str
    kind: str
    config: dict
    fingerprinted: dict
    num_rounds: int
    eval_every: int | None
    path: pathlib.Path | None
    every: int | None
    flush_seconds: float
    header: dict | None = None
    label: str = ""
    bar: str = ""
    log: logging.Logger | None = None
    safety_net: SafetyNet | None = DEFAULT_NET

    def __post_init__(self):
        if self.safety_net is not None and not isinstance(self.safety_net, SafetyNet):
            raise TypeError(f"safety_net must be a fathom_tune.SafetyNet or None, got {self.safety_net!r}")

    @property
    def net_settings(self) -> dict | None:
        """The net's settings as the study config and the fingerprint hold them."""
        return None if self.safety_net is None else self.safety_net.settings()

    @functools.cached_property
    def fingerprint(self) -> dict:
        """What a checkpoint of this run must match (built once: every save uses it)."""
        return ckpt.fingerprint(
            self.engine, study=self.name, num_rounds=self.num_rounds, eval_every=self.eval_every,
            config=self.fingerprinted, safety_net=self.net_settings,
        )

    def save(self, done: Progress, trees: dict) -> None:
        """Checkpoints ``done`` with the schedule's ``trees`` (taken with that round)."""
        state, beside = self.schedule.stored(done.state)
        progress = done if state is done.state else dataclasses.replace(done, state=state)
        ckpt.save_run(self.path, kind=self.kind, fingerprint=self.fingerprint, progress=progress,
                      trees={**beside, **trees})

    def load(self) -> Progress:
        """The checkpoint's progress; the schedule takes its state from it."""
        fresh = self.engine.init()
        state, beside = self.schedule.stored(fresh)
        progress, trees = ckpt.load_run(
            self.path, kind=self.kind, fingerprint=self.fingerprint, state=state,
            templates={**beside, **self.schedule.trees()},
        )
        self.schedule.restore(trees)
        restored = self.schedule.unstored(fresh, progress.state, trees)
        return progress if restored is progress.state else dataclasses.replace(progress, state=restored)

    def __call__(self, opened, progress: bool) -> TuningResult:
        resume = self.load() if self.path is not None and self.path.exists() else None
        study, recorded = driver.open_study(
            opened, name=self.name, resume=resume, path=self.path, task=self.task, tuner=self.tuner,
            seed=self.engine.seed, num_rounds=self.num_rounds,
            config={**self.config, "safety_net": self.net_settings},
            sampler=self.schedule.sampler, header=self.header,
        )
        if self.log is not None:
            at = 0 if resume is None else resume.state.round
            self.log.info("%s: %s at round %d of %d", self.label, "resumed" if resume else "started", at,
                          self.num_rounds)
        self.schedule.opened(study)
        rounds = Rounds(self.schedule, self.schedule.search_space(self.task), recorded, self.safety_net,
                        () if resume is None else resume.rows)
        with driver.RoundWriter(
            study,
            rounds,
            None if self.path is None else self.save,
            num_rounds=self.num_rounds,
            flush_seconds=self.flush_seconds,
            every=self.every,
            extra=self.schedule.trees,
            label=self.label,
        ) as writer:
            out = run(
                self.engine,
                rounds,
                num_rounds=self.num_rounds,
                eval_every=self.eval_every,
                resume=resume,
                on_round=writer.on_round,
                progress=self.bar if progress else False,
                judge=rounds.judge,
            )
        test_metrics = self.engine.evaluate(out.params, "test")
        hparams = self.schedule.returned()
        record.write_outcome(study, hparams=hparams, validation=out.final_metrics, test=test_metrics, ledger=out.cost)
        return TuningResult.of_run(
            out, self.task, study=study, hparams=hparams, test_metrics=test_metrics,
            history=self.schedule.history(out.history),
        )


def checked_path(checkpoint, storage) -> pathlib.Path | None:
    """``checkpoint`` as a path (:func:`fathom_tune.storage.checkpoint.check_path`).

    Raises:
        ValueError: a checkpoint without a persistent storage.
    """
    path = ckpt.check_path(checkpoint)
    if path is not None and storage is None:
        raise ValueError(
            "checkpoint needs a persistent storage (an RDB URL or a journal file path): the "
            "rounds of an in-memory study would be lost with the process"
        )
    return path


def run_one(one: OneRun, storage, progress: bool) -> TuningResult:
    """Runs ``one`` on ``storage``, holding its checkpoint while it runs.

    A checkpoint that is damaged, from another run, or whose SQLite storage
    is gone is refused before anything is written.
    """
    if one.path is not None and one.path.exists():
        one.load()
        driver.refuse_orphan_checkpoint(one.path, storage)
    opened = open_storage(storage)
    with ckpt.exclusive(one.path) if one.path is not None else contextlib.nullcontext():
        return one(opened, progress)


def run_schedule(
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
    safety_net: SafetyNet | None = DEFAULT_NET,
    **engine_kwargs,
) -> TuningResult:
    """One run of a schedule on ``task``, recorded as the study ``<task>/<tuner>/seed<seed>``
    (``fathom_tune.peers.run_peer``).

    ``schedule_for(engine)`` makes the tuner's :class:`OneRunSchedule`;
    ``config`` (the tuner's settings) is recorded and a checkpoint must match
    it; ``header`` adds study attributes (e.g. FedEx's arms); ``safety_net``
    judges every round (:class:`~fathom_tune.SafetyNet`; ``None``: off); the
    other arguments are :func:`fathom_tune.optimize`'s. A ``checkpoint`` (needs a
    persistent storage) is written after each batch of rounds reaches the
    storage (see :data:`FLUSH_SECONDS`).
    """
    engine = Engine(task, seed=seed, **engine_kwargs)
    num_rounds = checks.positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    if eval_every is not None:
        checks.positive_int("eval_every", eval_every)
    name = study_name or record.study_name(task.name, tuner, seed)
    path = checked_path(checkpoint, storage)
    one = OneRun(
        task=task, engine=engine, schedule=schedule_for(engine), tuner=tuner, name=name, kind=f"peer:{tuner}",
        config=config, fingerprinted=config, num_rounds=num_rounds, eval_every=eval_every, path=path,
        every=None, flush_seconds=FLUSH_SECONDS, header=header, label=f"{tuner} {task.name}",
        bar=f"{tuner} {task.name}", safety_net=safety_net,
    )
    return run_one(one, storage, progress)


@dataclasses.dataclass(frozen=True)
class OneRunTuner(Tuner, abc.ABC):
    """A registered one-run tuner: one run of ``task.num_rounds`` rounds whatever the budget.

    With a persistent storage and a ``checkpoint_dir`` it is crash-safe and
    re-runnable as :class:`~fathom_tune.fathom.Fathom` is: a finished run is
    read back from the storage, a run cut off mid-way continues from its
    checkpoint, and a partial study without a checkpoint is deleted and run
    again from round 0.

    Attributes:
        safety_net: keyword only; the run's :class:`~fathom_tune.SafetyNet`
            (default :data:`DEFAULT_NET`), ``None`` to turn it off.
    """

    safety_net: SafetyNet | None = dataclasses.field(default=DEFAULT_NET, kw_only=True)

    @abc.abstractmethod
    def schedule_for(self, engine: Engine) -> OneRunSchedule:
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
        return run_schedule(
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
            safety_net=self.safety_net,
            **self.engine_options(request.task),
        )
