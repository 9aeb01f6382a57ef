"""``fathom_tune.optimize``: one FedAvg run tuned by FATHOM, recorded as an Optuna study.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). Every communication round is one Optuna trial: the
:class:`~fathom_tune.FathomSampler` suggests the round's hyperparameters from
the study's earlier rounds, the engine runs the round, and the round's
hypergradients ``G`` (from the clients) and ``H`` (from the server's moving
average of updates) are told back with the training loss as the value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import pathlib
import warnings

import jax
import optuna
import pandas as pd
from optuna.trial import TrialState

from fathom_tune import __version__  # set in the package __init__ before this import
from fathom_tune._checkpoint import CheckpointError, jsonable, load_checkpoint, save_checkpoint
from fathom_tune._hparams import NAMES, HParams
from fathom_tune._hypergrad import FathomConfig, ServerTracker
from fathom_tune._sampler import DIVERGED_ATTR, FathomSampler, report_divergence, report_round
from fathom_tune._storage import open_storage
from fathom_tune.engine import Cost, Engine, RoundResult, ServerState
from fathom_tune.loop import Outcome, Progress, rounds_to_target, run
from fathom_tune.task import Target, Task, check_positive_int

__all__ = ["OptimizeResult", "make_study_name", "optimize"]

TUNER = "fathom"

ROUND_ATTR = "round"
"""Trial user attr: the 0-based communication round the trial recorded."""

STALE_ATTR = "fathom.stale"
"""Trial user attr: ``True`` on a round left RUNNING by a killed run and failed on resume."""


def make_study_name(task_name: str, tuner: str, seed: int) -> str:
    """The study naming convention, ``<task>/<tuner>/seed<k>``.

    >>> make_study_name("digits", "fathom", 0)
    'digits/fathom/seed0'
    """
    return f"{task_name}/{tuner}/seed{seed}"


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """The outcome of :func:`optimize`.

    Attributes:
        study: the Optuna study, one trial per round.
        history: one row per round: ``round``, ``learning_rate``,
            ``local_epochs``, ``batch_size``, ``local_steps``, ``H``, ``G``,
            ``train_loss``, ``accepted`` (False for a discarded divergent
            round), ``val_<metric>`` on evaluation rounds, and the cumulative
            ``rounds``, ``examples``, ``steps``, ``bytes_up``,
            ``bytes_down`` and ``seconds``.
        hparams: the hyperparameters FATHOM would use next.
        params: the final model parameters.
        state: the final server state.
        cost: the run's ledger (every round).
        final_metrics: validation metrics of the final model.
        test_metrics: test metrics of the final model (reported, never used to tune).
        target: the task's target.
    """

    study: optuna.Study
    history: pd.DataFrame
    hparams: HParams
    params: object
    state: ServerState
    cost: Cost
    final_metrics: dict[str, float]
    test_metrics: dict[str, float]
    target: Target

    def rounds_to_target(self, target: Target | None = None) -> int | None:
        """Communication rounds until validation first met ``target`` (default: the task's)."""
        return rounds_to_target(self.history, target or self.target)

    def examples_to_target(self, target: Target | None = None) -> int | None:
        """Client examples processed until validation first met ``target``."""
        return rounds_to_target(self.history, target or self.target, column="examples")


@jax.jit
def _server_step(tracker: ServerTracker, update, alpha):
    return tracker.update(update, alpha=alpha)


class _FathomSchedule:
    """The loop's schedule: ask a trial per round, tell it with G, H and the loss.

    ``recorded`` maps rounds that the study already finished (a resumed run
    whose checkpoint is older than the study) to their trials: those rounds
    are run again from the checkpoint, deterministically, with the recorded
    hyperparameters, and nothing new is written for them.
    """

    def __init__(self, study, sampler: FathomSampler, tracker: ServerTracker, recorded=None):
        self.study = study
        self.sampler = sampler
        self.tracker = tracker
        self.recorded = dict(recorded or {})
        self.trial: optuna.Trial | None = None
        self.replay = None

    def propose(self, round_index: int) -> HParams:
        self.replay = self.recorded.pop(round_index, None)
        if self.replay is not None:
            return HParams(**{n: self.replay.params[n] for n in NAMES})
        with warnings.catch_warnings():  # one round per trial: the checkpoint lock, not a
            # heartbeat, tells a dead run's trial (see _reconcile)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            self.trial = self.study.ask()
        self.trial.set_user_attr(ROUND_ATTR, round_index)
        return self.sampler.suggest(self.trial)

    def observe(self, result: RoundResult, metrics, accepted: bool) -> Outcome:
        if not accepted:
            if self.replay is None:
                report_divergence(self.trial)
                self.trial.set_user_attr("local_steps", int(result.local_steps.sum()))
                self.trial.set_user_attr("examples", int(result.cost.examples))
                self.study.tell(self.trial, state=TrialState.FAIL)
            return Outcome(record={"H": math.nan, "diverged": True})
        h, tracker = _server_step(self.tracker, result.update, self.sampler.config.alpha)
        self.tracker = tracker
        h = float(h)
        if self.replay is not None:
            if not math.isclose(self.replay.value, result.train_loss, rel_tol=1e-5, abs_tol=1e-7):
                warnings.warn(
                    f"round {result.round} replayed after a resume gave training loss "
                    f"{result.train_loss!r}; the study recorded {self.replay.value!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return Outcome(record={"H": h, "diverged": False})
        trial = self.trial
        trial.set_user_attr("local_steps", int(result.local_steps.sum()))
        trial.set_user_attr("examples", int(result.cost.examples))
        report_round(trial, G=result.local_hypergradient, H=h)
        for k, v in (metrics or {}).items():
            trial.set_user_attr(f"val_{k}", v)
        self.study.tell(trial, result.train_loss)
        return Outcome(record={"H": h, "diverged": False})


def _describe(value):
    """A JSON form of an engine setting: numbers, strings and their lists; else the type's name."""
    scalar = (int, float, str, bool, type(None))
    if isinstance(value, scalar):
        return value
    if type(value) in (tuple, list) and all(isinstance(v, scalar) for v in value):
        return list(value)
    return type(value).__name__


def _fingerprint(task: Task, seed: int, num_rounds: int, eval_every, config, name, engine_kwargs):
    """What must match between a checkpoint and the run that resumes it."""
    return jsonable(
        {
            "task": task.name,
            "seed": seed,
            "num_rounds": num_rounds,
            "eval_every": eval_every,
            "study_name": name,
            "config": dataclasses.asdict(config),
            "engine": {k: _describe(v) for k, v in sorted(engine_kwargs.items())},
        }
    )


@contextlib.contextmanager
def _exclusive(path: pathlib.Path):
    """Holds an exclusive lock on ``<path>.lock`` while the run goes on; removes it after.

    The kernel drops the lock when the process dies, so a stale lock file never
    blocks a resume. After locking, the file is checked to still be the one at
    the path (another process may have removed it in between).
    """
    lock = path.with_name(path.name + ".lock")
    while True:
        f = open(lock, "a")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ValueError(
                f"checkpoint={str(path)!r} is in use by another running process "
                f"(lock {str(lock)!r} is held); one FATHOM run per checkpoint"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()


def _check_checkpoint_path(checkpoint) -> pathlib.Path | None:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise TypeError(f"checkpoint must be a file path or None, got {checkpoint!r}")
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint={str(path)!r} is a directory; give a file path such as run.npz")
    if not path.parent.is_dir():
        raise ValueError(f"checkpoint={str(path)!r}: directory {str(path.parent)!r} does not exist")
    return path


def _load_progress(path, fingerprint, templates) -> tuple[Progress, ServerTracker]:
    meta, trees = load_checkpoint(path, kind=TUNER, templates=templates)
    if meta.get("fingerprint") != fingerprint:
        got = meta.get("fingerprint") or {}
        differ = sorted(k for k in set(got) | set(fingerprint) if got.get(k) != fingerprint.get(k))
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to another run: it differs in {differ} "
            f"(checkpoint: {[got.get(k) for k in differ]}, this run: "
            f"{[fingerprint.get(k) for k in differ]})"
        )
    state = ServerState(params=trees["params"], opt_state=trees["opt_state"], round=meta["round"])
    progress = Progress(
        state=state,
        rows=tuple(meta["rows"]),
        cost=Cost(**meta["cost"]),
        final_metrics=meta["final_metrics"],
    )
    return progress, ServerTracker(momentum=trees["momentum"])


def _trial_round(trial) -> int:
    return int(trial.user_attrs.get(ROUND_ATTR, trial.number))


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
    checkpoint_every: int = 1,
    progress: bool = True,
    **engine_kwargs,
) -> OptimizeResult:
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
            and writes it every ``checkpoint_every`` rounds (atomically: the
            model, the server optimizer state, FATHOM's ``m``, the round,
            the ledger and the history); if it exists the run continues from
            it and ends exactly as an uninterrupted run would. While a run
            holds the checkpoint, a second run on it is refused.
        checkpoint_every: rounds between checkpoints.
        progress: show a progress bar.
        **engine_kwargs: passed to :class:`~fathom_tune.engine.Engine`
            (``server_optimizer``, ``buckets``, ``client_block``, ...).

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        TypeError, ValueError: for bad arguments, before anything is written.
        fathom_tune.CheckpointError: a checkpoint that is damaged or from
            another run (other task, seed, rounds, config or study).

    Example:
        >>> import fathom_tune
        >>> result = fathom_tune.optimize(fathom_tune.tasks.digits(), num_rounds=5, progress=False)
        >>> len(result.study.trials), list(result.history["round"])
        (5, [0, 1, 2, 3, 4])
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
    config = FathomConfig() if config is None else config
    if not isinstance(config, FathomConfig):
        raise TypeError(f"config must be a FathomConfig or None, got {type(config).__name__}")
    init = config.init or task.init_hparams
    bounds = config.bounds or task.bounds
    bounds.check(init, "config.init" if config.init else "task.init_hparams")
    config = dataclasses.replace(config, init=init, bounds=bounds)
    if study_name is not None and (not isinstance(study_name, str) or not study_name):
        raise ValueError(f"study_name must be a non-empty str or None, got {study_name!r}")
    name = study_name or make_study_name(task.name, TUNER, seed)
    engine = Engine(task, seed=seed, **engine_kwargs)
    num_rounds = check_positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    if eval_every is not None:
        check_positive_int("eval_every", eval_every)
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
    path = _check_checkpoint_path(checkpoint)
    if path is not None and storage is None:
        raise ValueError(
            "checkpoint needs a persistent storage (an RDB URL or a journal file path): the "
            "rounds of an in-memory study would be lost with the process"
        )
    fingerprint = None
    if path is not None:
        fingerprint = _fingerprint(task, seed, num_rounds, eval_every, config, name, engine_kwargs)
        if path.exists():  # refuse a bad checkpoint before anything is written
            _load_progress(path, fingerprint, _templates(engine.init()))
            if isinstance(storage, str) and storage.startswith("sqlite:///"):
                db = pathlib.Path(storage[len("sqlite:///") :])
                if not db.is_file():
                    raise CheckpointError(
                        f"checkpoint {str(path)!r} exists but storage={storage!r} does not: "
                        "resume with the storage the run was started with"
                    )
    opened = open_storage(storage)
    if path is None:
        return _optimize(task, engine, config, seed, num_rounds, eval_every, opened, name, progress)
    with _exclusive(path):
        return _optimize(
            task, engine, config, seed, num_rounds, eval_every, opened, name, progress,
            path=path,
            every=checkpoint_every,
            fingerprint=fingerprint,
        )


def _templates(state: ServerState) -> dict:
    """The shapes a FATHOM checkpoint's trees must have, from a fresh server state."""
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "momentum": ServerTracker.init(state.params).momentum,
    }


def _optimize(
    task, engine, config, seed, num_rounds, eval_every, opened, name, progress,
    path=None, every=1, fingerprint=None,
):
    sampler = FathomSampler(init=config.init, bounds=config.bounds, config=config, seed=seed)
    state = engine.init()
    tracker = ServerTracker.init(state.params)
    resume = None
    if path is not None and path.exists():
        resume, tracker = _load_progress(path, fingerprint, _templates(state))
    existing = {}
    if opened is not None:
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(opened)}
    if resume is None and existing.get(name):
        raise ValueError(
            f"study_name={name!r} already holds {existing[name]} rounds in this storage; "
            "a FATHOM run cannot continue without its model: choose another study_name or "
            "storage, or pass the checkpoint= of the run that wrote it"
        )
    if resume is not None and name not in existing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at round {resume.state.round} but the storage holds no "
            f"study {name!r}; resume with the storage the run was started with"
        )
    study = optuna.create_study(
        storage=opened, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True
    )
    recorded = {}
    if resume is not None:
        recorded = _reconcile(study, resume, path)
    else:
        for key, value in {
            "task": task.name,
            "tuner": TUNER,
            "seed": seed,
            "budget_rounds": num_rounds,
            "version": __version__,
            "target_metric": task.target.metric,
            "target_value": task.target.value,
            "target_mode": task.target.mode,
            "config": {
                k: v for k, v in dataclasses.asdict(config).items() if k not in ("init", "bounds")
            },
        }.items():
            study.set_user_attr(key, value)
    schedule = _FathomSchedule(study, sampler, tracker, recorded)

    def on_round(done: Progress) -> None:
        if len(done.rows) % every == 0 or len(done.rows) == num_rounds:
            meta = {
                "fingerprint": fingerprint,
                "round": done.state.round,
                "rng": {"seed": seed, "round": done.state.round},
                "rows": jsonable(list(done.rows)),
                "cost": done.cost.as_dict(),
                "final_metrics": jsonable(done.final_metrics),
            }
            trees = {
                "params": done.state.params,
                "opt_state": done.state.opt_state,
                "momentum": schedule.tracker.momentum,
            }
            save_checkpoint(path, kind=TUNER, meta=meta, trees=trees)

    out = run(
        engine,
        schedule,
        num_rounds=num_rounds,
        eval_every=eval_every,
        state=state,
        resume=resume,
        on_round=None if path is None else on_round,
        progress="FATHOM " + task.name if progress else False,
    )
    test_metrics = engine.evaluate(out.params, "test")
    for k, v in test_metrics.items():
        study.set_user_attr(f"test_{k}", v)
    history = out.history
    order = ["round", "learning_rate", "local_epochs", "batch_size", "local_steps", "H", "G", "train_loss"]
    history = history[order + [c for c in history.columns if c not in order]]
    return OptimizeResult(
        study=study,
        history=history,
        hparams=sampler.next_hparams(study),
        params=out.params,
        state=out.state,
        cost=out.cost,
        final_metrics=out.final_metrics,
        test_metrics=test_metrics,
        target=task.target,
    )


def _reconcile(study: optuna.Study, resume: Progress, path) -> dict:
    """Fails the rounds a killed run left RUNNING; returns the finished rounds past the checkpoint.

    The caller holds the checkpoint's lock, so no other process is running
    this study's rounds: a RUNNING trial is stale.
    """
    done = len(resume.rows)
    finished = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
            study.tell(trial.number, state=TrialState.FAIL)
        elif trial.state == TrialState.COMPLETE or (
            trial.state == TrialState.FAIL and trial.user_attrs.get(DIVERGED_ATTR) is True
        ):
            finished[_trial_round(trial)] = trial
    missing = [r for r in range(done) if r not in finished]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at round {done} but study {study.study_name!r} has no "
            f"finished trial for rounds {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            "resume with the storage the run was started with"
        )
    return {r: t for r, t in finished.items() if r >= done}
