"""``fathom_tune.optimize``: one FedAvg run tuned by FATHOM, recorded as an Optuna study.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). Every communication round is one Optuna trial: the
:class:`~fathom_tune.FathomSampler` suggests the round's hyperparameters from
the study's earlier rounds, the engine runs the round with FATHOM's client
statistic ``phi`` turned on, and the round's hypergradients ``G`` (from the
clients) and ``H`` (from the server's moving average of updates) are told
back with the training loss as the value, through :mod:`fathom_tune.record`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import pathlib
import time
import warnings

import optax
import optuna
from optuna.storages import InMemoryStorage
from optuna.trial import FrozenTrial, TrialState

from fathom_tune import checkpoint as ckpt
from fathom_tune import checks, record
from fathom_tune._batch import Writes, add_trials
from fathom_tune.engine import FEDAVG_SERVER, Engine, RoundResult
from fathom_tune.fathom.hypergrad import (
    LocalAgreement,
    TrackedState,
    local_hypergradient,
    track_agreement,
)
from fathom_tune.fathom.sampler import FathomSampler, report_divergence, report_round
from fathom_tune.fathom.state import FathomConfig
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.loop import Outcome, Progress, run
from fathom_tune.storage import open_storage
from fathom_tune.task import Task
from fathom_tune.tuners import TuningResult

__all__ = ["optimize"]

TUNER = "fathom"
CHECKPOINT_KIND = "fathom"

_log = logging.getLogger(__name__)
_rounds_log = logging.getLogger("fathom_tune.rounds")
"""One INFO line per round (a command line turns it on to show the run as it happens)."""

ROUND_HEADER = f"{'round':>5} {'eta':>9} {'E':>8} {'B':>8} {'steps':>6} {'H':>7} {'G':>7} {'loss':>9}  validation"


class _FathomSchedule:
    """The loop's schedule: each round's hyperparameters, and each round as a finished trial.

    The hyperparameters come from :meth:`FathomSampler.after` the previous
    round, as the sampler derives them from that round's trial; each round
    is queued in ``pending`` (a :class:`_Round`, the few numbers its trial is
    made of) until the run flushes a batch to the storage, where it becomes
    the trial the sampler's ask-and-tell protocol would write (its three
    parameters, ``G``, ``H``, cost, evaluations; training loss as value,
    ``FAIL`` for a diverged round; :func:`fathom_tune._batch.add_trials`).
    Building the trials with the write keeps that work off the rounds'
    critical path (on the writer's thread for a persistent storage).

    ``recorded`` maps rounds that the study already finished (a resumed run
    whose checkpoint is older than the study) to their trials: those rounds
    are run again from the checkpoint, deterministically, with the recorded
    hyperparameters, and nothing new is written for them.
    """

    def __init__(self, study, sampler: FathomSampler, recorded=None):
        self.study = study
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

    def take(self) -> list[FrozenTrial]:
        """The queued rounds as trials (the queue starts empty again)."""
        return self.taker()()

    def taker(self):
        """The queued rounds, as a function that makes them trials (for the writer's thread)."""
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


def _refuse_orphan_checkpoint(path: pathlib.Path, storage) -> None:
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        if not pathlib.Path(storage[len("sqlite:///") :]).is_file():
            raise ckpt.CheckpointError(
                f"checkpoint {str(path)!r} exists but storage={storage!r} does not: "
                "resume with the storage the run was started with"
            )


def optimize(
    task: Task,
    *,
    config: FathomConfig | None = None,
    seed: int = 0,
    num_rounds: int | None = None,
    eval_every: int | None = None,
    storage=None,
    study_name: str | None = None,
    checkpoint=None,
    checkpoint_every: int | None = None,
    flush_seconds: float = 1.0,
    progress: bool = False,
    tuner: str = TUNER,
    **engine_kwargs,
) -> TuningResult:
    """Trains ``task`` with FedAvg while FATHOM tunes eta, E and B every round.

    Args:
        task: the federated task (e.g. ``fathom_tune.tasks.digits()``).
        config: FATHOM's settings (:class:`FathomConfig`); its ``init`` and
            ``bounds`` default to the task's.
        seed: model initialisation, client sampling and shuffling.
        num_rounds: communication rounds (default: the task's).
        eval_every: validation cadence in rounds (default: the task's).
        storage: ``None`` (in memory), an Optuna storage, an RDB URL such as
            ``"sqlite:///fathom.db"``, or a journal file path.
        study_name: default ``<task>/fathom/seed<seed>``. Without a
            checkpoint, the study must not hold rounds already.
        checkpoint: a file path (``.npz``) for crash-safe resume, used with a
            persistent ``storage``. If the file does not exist the run starts
            and writes it each time it writes rounds to the storage
            (atomically: the model, the server optimizer state, FATHOM's
            ``m``, the round, the ledger and the history); if it exists the
            run continues from it and ends exactly as an uninterrupted run
            would, a kill at any moment included (rounds the storage had not
            received yet are run again from the checkpoint). While a run
            holds the checkpoint, a second run on it is refused.
        checkpoint_every: also write the rounds and the checkpoint at least
            every this many rounds (default: only as ``flush_seconds`` says).
        flush_seconds: rounds are written to the storage in batches, one
            transaction per batch: after the first round that ends at least
            this many seconds after the last write, at the end of the run,
            and on an interrupt or error. ``0`` writes every round as it
            ends (slower: a transaction per round).
        progress: show a progress bar.
        tuner: the tuner name recorded in the study (and its default name);
            a registered FATHOM variant passes its own.
        **engine_kwargs: passed to :class:`~fathom_tune.engine.Engine`
            (``server_optimizer``, ``buckets``, ``client_block``, ...).

    Returns:
        A :class:`~fathom_tune.tuners.TuningResult` whose ``history`` has one
        row per round: ``round``, ``learning_rate``, ``local_epochs``,
        ``batch_size``, ``local_steps``, ``H``, ``G``, ``train_loss``,
        ``accepted`` (False for a discarded divergent round),
        ``val_<metric>`` on evaluation rounds, and the cumulative ``rounds``,
        ``examples``, ``steps``, ``bytes_up``, ``bytes_down`` and
        ``seconds``; ``hparams`` are the values FATHOM would use next.

    Raises:
        TypeError, ValueError: for bad arguments, before anything is written.
        fathom_tune.CheckpointError: a checkpoint that is damaged or from
            another run (other task, seed, rounds, config, engine settings
            such as the server optimizer, or study).

    Example:
        >>> import fathom_tune
        >>> result = fathom_tune.optimize(fathom_tune.tasks.digits(), num_rounds=5)
        >>> len(result.study.trials), list(result.history["round"])
        (5, [0, 1, 2, 3, 4])
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
    config = FathomConfig() if config is None else config
    if not isinstance(config, FathomConfig):
        raise TypeError(f"config must be a FathomConfig or None, got {type(config).__name__}")
    config = config.resolve(task)
    if study_name is not None and (not isinstance(study_name, str) or not study_name):
        raise ValueError(f"study_name must be a non-empty str or None, got {study_name!r}")
    name = study_name or record.study_name(task.name, tuner, seed)
    server = engine_kwargs.pop("server_optimizer", None)
    if server is not None and not isinstance(server, optax.GradientTransformation):
        raise TypeError(f"server_optimizer must be an optax.GradientTransformation, got {type(server).__name__}")
    # FATHOM's server side (H and m) runs inside the round's compiled call, in the
    # server optimizer's state.
    server = track_agreement(FEDAVG_SERVER if server is None else server, config.alpha)
    engine = Engine(task, seed=seed, client_statistic=LocalAgreement(), server_optimizer=server, **engine_kwargs)
    num_rounds = checks.positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    if eval_every is not None:
        checks.positive_int("eval_every", eval_every)
    every = None if checkpoint_every is None else checks.positive_int("checkpoint_every", checkpoint_every)
    flush_seconds = checks.nonnegative_real("flush_seconds", flush_seconds)
    path = ckpt.check_path(checkpoint)
    if path is not None and storage is None:
        raise ValueError(
            "checkpoint needs a persistent storage (an RDB URL or a journal file path): the "
            "rounds of an in-memory study would be lost with the process"
        )
    run_ = _Run(task, engine, config, num_rounds, eval_every, name, path, every, tuner, flush_seconds)
    if path is not None and path.exists():  # refuse a bad checkpoint before anything is written
        run_.load()
        _refuse_orphan_checkpoint(path, storage)
    opened = open_storage(storage)
    if path is None:
        return run_(opened, progress)
    with ckpt.exclusive(path):
        return run_(opened, progress)


@dataclasses.dataclass
class _Run:
    """One FATHOM run's fixed parts, and the steps of :func:`optimize` that use the storage."""

    task: Task
    engine: Engine
    config: FathomConfig
    num_rounds: int
    eval_every: int | None
    name: str
    path: pathlib.Path | None
    every: int | None
    tuner: str
    flush_seconds: float

    @functools.cached_property
    def fingerprint(self) -> dict:
        """What a checkpoint of this run must match (built once: every round's save uses it)."""
        config = ckpt.jsonable(dataclasses.asdict(self.config))
        return ckpt.fingerprint(
            self.engine, study=self.name, num_rounds=self.num_rounds, eval_every=self.eval_every, config=config
        )

    def write(self, study: optuna.Study, trials: list[FrozenTrial], done: Progress | None) -> None:
        """Writes ``trials`` (one transaction), then checkpoints ``done``: the checkpoint is
        never ahead of the storage (a study ahead of it is replayed on resume).

        The checkpoint holds the server optimizer's own state, and FATHOM's ``m``
        apart (``momentum``), not the :func:`track_agreement` state around them:
        the layout is the same whatever server optimizer FATHOM wraps.
        """
        add_trials(study, trials)
        if self.path is not None and done is not None:
            tracked: TrackedState = done.state.opt_state
            ckpt.save_run(
                self.path,
                kind=CHECKPOINT_KIND,
                fingerprint=self.fingerprint,
                progress=dataclasses.replace(done, state=dataclasses.replace(done.state, opt_state=tracked.inner)),
                trees={"momentum": tracked.momentum},
            )

    def load(self) -> Progress:
        state = self.engine.init()
        fresh: TrackedState = state.opt_state
        progress, trees = ckpt.load_run(
            self.path,
            kind=CHECKPOINT_KIND,
            fingerprint=self.fingerprint,
            state=dataclasses.replace(state, opt_state=fresh.inner),
            templates={"momentum": fresh.momentum},
        )
        restored = progress.state
        tracked = fresh._replace(inner=restored.opt_state, momentum=trees["momentum"])
        return dataclasses.replace(progress, state=dataclasses.replace(restored, opt_state=tracked))

    def open_study(self, opened) -> tuple[optuna.Study, Progress | None]:
        resume = None
        if self.path is not None and self.path.exists():
            resume = self.load()
        existing = {}
        if opened is not None:
            existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(opened)}
        if resume is None and existing.get(self.name):
            raise ValueError(
                f"study_name={self.name!r} already holds {existing[self.name]} rounds in this "
                "storage; a FATHOM run cannot continue without its model: choose another "
                "study_name or storage, or pass the checkpoint= of the run that wrote it"
            )
        if resume is not None and self.name not in existing:
            raise ckpt.CheckpointError(
                f"checkpoint {str(self.path)!r} is at round {resume.state.round} but the storage "
                f"holds no study {self.name!r}; resume with the storage the run was started with"
            )
        config = self.config
        sampler = FathomSampler(init=config.init, bounds=config.bounds, config=config, seed=self.engine.seed)
        study = optuna.create_study(
            storage=opened, study_name=self.name, sampler=sampler, direction="minimize", load_if_exists=True
        )
        record.write_header(
            study,
            task=self.task.name,
            tuner=self.tuner,
            seed=self.engine.seed,
            unit="round",
            target=self.task.target,
            rounds_per_run=self.num_rounds,
            budget_rounds=self.num_rounds,
            config=config.settings(),
            objective="train_loss",  # each round's trial holds its training loss
        )
        return study, resume

    def __call__(self, opened, progress: bool) -> TuningResult:
        study, resume = self.open_study(opened)
        recorded = {} if resume is None else _reconcile(study, resume, self.path)
        _log.info(
            "FATHOM %s: %s at round %d of %d",
            self.name,
            "resumed" if resume else "started",
            0 if resume is None else resume.state.round,
            self.num_rounds,
        )
        sampler = study.sampler
        schedule = _FathomSchedule(study, sampler, recorded)

        # Rounds and checkpoints are written by one background job at a time, so a
        # commit's or an fsync's wait overlaps the next rounds' training.
        writes = Writes(threaded=self.path is not None or not isinstance(study._storage, InMemoryStorage))
        last = {"write": time.monotonic(), "done": resume}

        def write(done: Progress | None) -> None:
            trials = schedule.taker()
            if done is not None:  # the rows as they are now, for the writer's thread
                done = dataclasses.replace(done, rows=tuple(done.rows))

            def job() -> None:
                try:
                    self.write(study, trials(), done)
                except BaseException:
                    last["failed"] = True  # its rounds are lost: no later checkpoint may pass them
                    raise

            writes.submit(job)
            last["write"] = time.monotonic()

        def on_round(done: Progress) -> None:
            rounds = len(done.rows)
            last["done"] = done
            if rounds == self.num_rounds or (self.every is not None and rounds % self.every == 0):
                write(done)
            elif time.monotonic() - last["write"] >= self.flush_seconds and not writes.busy():
                write(done)

        try:
            out = run(
                self.engine,
                schedule,
                num_rounds=self.num_rounds,
                eval_every=self.eval_every,
                resume=resume,
                on_round=on_round,
                progress="FATHOM " + self.task.name if progress else False,
            )
            if schedule.pending:  # stopped before the last round
                write(last["done"])
            writes.drain()
        except BaseException:  # an interrupt, a kill signal turned exception, an error
            try:
                writes.drain()
                if not last.get("failed"):
                    self.write(study, schedule.take(), last["done"])
            except Exception:  # noqa: BLE001 - the original exception is the one to see
                _log.exception("FATHOM %s: could not write the rounds queued at the interrupt", self.name)
            raise
        finally:
            writes.close()
        test_metrics = self.engine.evaluate(out.params, "test")
        hparams = schedule.next
        record.write_outcome(
            study, hparams=hparams, validation=out.final_metrics, test=test_metrics, ledger=out.cost
        )
        order = ["round", *NAMES, "local_steps", "H", "G", "train_loss"]
        history = out.history[order + [c for c in out.history.columns if c not in order]]
        return TuningResult.of_run(
            out, self.task, study=study, hparams=hparams, test_metrics=test_metrics, history=history
        )


def _reconcile(study: optuna.Study, resume: Progress, path) -> dict:
    """Fails the rounds a killed run left RUNNING; returns the finished rounds past the checkpoint.

    The caller holds the checkpoint's lock, so no other process is running
    this study's rounds: a RUNNING trial is stale.
    """
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record.mark_stale(study, trial)
    done = len(resume.rows)
    return {r: t for r, t in record.finished_rounds(study, done, path).items() if r >= done}
