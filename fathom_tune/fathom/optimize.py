"""``fathom_tune.optimize``: one FedAvg run tuned by FATHOM, recorded as an Optuna study.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). Every communication round is one Optuna trial: the
:class:`~fathom_tune.FathomSampler` suggests the round's hyperparameters from
the study's earlier rounds, the engine runs the round with FATHOM's client
statistic ``phi`` turned on, and the round's hypergradients ``G`` (from the
clients) and ``H`` (from the server's moving average of updates) are told
back with the training loss as the value, through :mod:`fathom_tune.record`.
The run is :class:`~fathom_tune.fathom.schedule.FathomSchedule` on the one
one-run driver (:mod:`fathom_tune.tuning.one_run`), as every one-run tuner's is.
"""

from __future__ import annotations

import dataclasses
import logging

import optax

from fathom_tune import checks
from fathom_tune.engine import FEDAVG_SERVER, Engine
from fathom_tune.fathom.hypergrad import LocalAgreement, track_agreement
from fathom_tune.fathom.sampler import FathomSampler
from fathom_tune.fathom.schedule import ROUND_HEADER, FathomSchedule
from fathom_tune.fathom.state import FathomConfig
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import record
from fathom_tune.task import Task
from fathom_tune.tuning.driver import FLUSH_SECONDS
from fathom_tune.tuning.one_run import DEFAULT_NET, OneRun, checked_path, run_one
from fathom_tune.tuning.safety import SafetyNet
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
    safety_net: SafetyNet | None = DEFAULT_NET,
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
        safety_net: the one-run driver's :class:`~fathom_tune.SafetyNet`
            (default ``SafetyNet()``): a round whose loss is not finite or
            blows up is rejected, its model dropped, and the next round runs
            with eta halved and the last accepted round's E and B. ``None``:
            the paper's FATHOM (only a non-finite round is discarded, eta halved).
        **engine_kwargs: passed to :class:`~fathom_tune.engine.Engine`
            (``server_optimizer``, ``buckets``, ``client_block``, ...).

    Returns:
        A :class:`~fathom_tune.tuners.TuningResult` whose ``history`` has one
        row per round: ``round``, ``learning_rate``, ``local_epochs``,
        ``batch_size``, ``local_steps``, ``H``, ``G``, ``train_loss``,
        ``accepted`` (False for a discarded round), ``rejected`` (why:
        ``"non-finite"``, ``"blow-up"``; once a round was discarded),
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
    path = checked_path(checkpoint, storage)
    sampler = FathomSampler(init=config.init, bounds=config.bounds, config=config, seed=engine.seed)
    one = OneRun(
        task=task,
        engine=engine,
        schedule=FathomSchedule(sampler),
        tuner=tuner,
        name=name,
        kind=CHECKPOINT_KIND,
        config=config.settings(),
        fingerprinted=ckpt.jsonable(dataclasses.asdict(config)),
        num_rounds=num_rounds,
        eval_every=eval_every,
        path=path,
        every=every,
        flush_seconds=flush_seconds,
        label=f"FATHOM {name}",
        bar="FATHOM " + task.name,
        log=_log,
        safety_net=safety_net,
    )
    return run_one(one, storage, progress)
