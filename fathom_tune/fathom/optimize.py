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
import functools
import logging
import pathlib

import optax

from fathom_tune import checks
from fathom_tune.engine import FEDAVG_SERVER, Engine
from fathom_tune.fathom.hypergrad import (
    LocalAgreement,
    TrackedState,
    track_agreement,
)
from fathom_tune.fathom.sampler import FathomSampler
from fathom_tune.fathom.schedule import ROUND_HEADER, FathomSchedule
from fathom_tune.fathom.state import FathomConfig
from fathom_tune.hparams import NAMES
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import open_storage, record
from fathom_tune.task import Task
from fathom_tune.tuning.driver import (
    FLUSH_SECONDS,
    RoundWriter,
    open_study,
    refuse_orphan_checkpoint,
)
from fathom_tune.tuning.loop import Progress, run
from fathom_tune.tuning.tuner import TuningResult

__all__ = ["ROUND_HEADER", "optimize"]

TUNER = "fathom"
CHECKPOINT_KIND = "fathom"

_log = logging.getLogger(__name__)


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
    flush_seconds: float = FLUSH_SECONDS,
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
        refuse_orphan_checkpoint(path, storage)
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

    def save(self, done: Progress, _extra=None) -> None:
        """Checkpoints ``done``: the server optimizer's own state, and FATHOM's ``m``
        apart (``momentum``), not the :func:`track_agreement` state around them:
        the layout is the same whatever server optimizer FATHOM wraps."""
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

    def __call__(self, opened, progress: bool) -> TuningResult:
        resume = self.load() if self.path is not None and self.path.exists() else None
        config = self.config
        sampler = FathomSampler(init=config.init, bounds=config.bounds, config=config, seed=self.engine.seed)
        study, recorded = open_study(
            opened,
            name=self.name,
            resume=resume,
            path=self.path,
            task=self.task,
            tuner=self.tuner,
            seed=self.engine.seed,
            num_rounds=self.num_rounds,
            config=config.settings(),
            sampler=sampler,
        )
        _log.info(
            "FATHOM %s: %s at round %d of %d",
            self.name,
            "resumed" if resume else "started",
            0 if resume is None else resume.state.round,
            self.num_rounds,
        )
        schedule = FathomSchedule(study, sampler, recorded)
        save = None if self.path is None else self.save
        with RoundWriter(
            study,
            schedule,
            save,
            num_rounds=self.num_rounds,
            flush_seconds=self.flush_seconds,
            every=self.every,
            label=f"FATHOM {self.name}",
        ) as writer:
            out = run(
                self.engine,
                schedule,
                num_rounds=self.num_rounds,
                eval_every=self.eval_every,
                resume=resume,
                on_round=writer.on_round,
                progress="FATHOM " + self.task.name if progress else False,
            )
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
