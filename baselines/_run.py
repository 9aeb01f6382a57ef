"""Running a baseline: an Optuna study of full FedAvg runs under a tuning budget.

The budget counts communication rounds (and optionally client examples)
summed over *every* trial of the study, pruned ones included, in every
worker. A trial runs ``task.num_rounds`` rounds unless pruned or diverged.

Budget rule, with any number of workers on one storage:

1. Before asking for a trial, a worker stops when the rounds of the finished
   trials, plus a full trial's rounds for every running trial, plus one more
   full trial exceed the budget (for examples: the cheapest possible trial).
2. After its hyperparameters are drawn, trial ``n`` records what a full run
   with them costs (rounds; client examples, exactly, since client sampling
   is a function of (seed, round)) and runs only if the finished trials'
   cost, plus that full cost for every *running trial numbered below n*,
   plus its own fits. Otherwise it is finished as FAIL, costs nothing, is
   marked with the ``not_run`` user attr, and the worker stops.

Trial numbers are assigned atomically by the storage (journal file, RDB), so
the admitted trial with the highest number saw every other admitted trial
either finished (at its actual cost) or running (at its full cost, which
bounds what it will spend): the budget is never exceeded, whatever the
interleaving. The price is that a worker may stop while budget remains,
when a trial it counted at full length is later pruned.

A killed worker: its running trial keeps its reservation until Optuna's
heartbeat finds it stale (RDB storages; ``heartbeat=(interval, grace)``).
The next worker to start a trial then fails it and retries it once as a new
trial with the same hyperparameters and intermediate values, which continues
from the killed run's last checkpoint when ``checkpoint_dir`` is given. A
stale trial costs nothing in the ledger (its retry records the whole run's
cost), so the work between its last checkpoint and the kill is not counted.
Workers take retries (WAITING trials) before anything else. Failing the stale
trial and creating its retry are two writes; between them the failed trial
keeps its full reservation (for at most ``RETRY_WAIT`` seconds after it
failed), so no worker spends the killed trial's budget on a new trial and
then finds no room for the retry.
"""

from __future__ import annotations

import logging
import math
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from baselines._budget import Budget, NotRun
from baselines._objective import Objective, check_space, preference
from baselines._registry import Baseline, get
from baselines._seeding import PerTrialSeed
from fathom_tune import checks, record
from fathom_tune.engine import Cost
from fathom_tune.hparams import NAMES, Bounds, HParams
from fathom_tune.storage import open_storage
from fathom_tune.storage.optuna_internals import resume_trial, trial_heartbeat
from fathom_tune.task import Task
from fathom_tune.tuners import TuningResult, result_from_record

__all__ = ["choose", "run"]

_log = logging.getLogger(__name__)


def choose(study: optuna.Study) -> FrozenTrial | None:
    """The trial a baseline returns: the best completed trial on validation.

    Reads only trial values (the final validation metric); ties go to the
    lower trial number. ``None`` when no trial completed.
    """
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not done:
        return None
    return max(done, key=lambda t: preference(t.number, t.value, study.direction))


def _check_heartbeat(heartbeat) -> None:
    if heartbeat is not None and (
        not isinstance(heartbeat, tuple)
        or len(heartbeat) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in heartbeat)
        or not 0 < heartbeat[0] < heartbeat[1]
    ):
        raise ValueError(
            f"heartbeat must be None or (interval, grace_period) ints with "
            f"0 < interval < grace_period, got {heartbeat!r}"
        )


def run(
    task: Task,
    name: str | Baseline,
    *,
    budget_rounds: int,
    budget_examples: int | None = None,
    seed: int = 0,
    storage=None,
    space: Bounds | None = None,
    worker: int = 0,
    checkpoint_dir=None,
    heartbeat: tuple[int, int] | None = (10, 30),
    progress: bool = False,
) -> TuningResult:
    """Runs baseline ``name`` on ``task`` until the tuning budget is spent.

    Every trial is one full static FedAvg run (:class:`~baselines.Objective`)
    with ``task.num_rounds`` rounds on ``Engine(task, seed=seed)``. The study
    maximizes the final validation target metric when ``task.target.mode`` is
    ``"max"`` and minimizes it otherwise. The study named
    ``<task>/<name>/seed<seed>`` is created in ``storage`` or, when it exists,
    continued: finished trials count against the budget and are not rerun.
    Several processes may call this at once on one journal file or RDB URL
    (give each a distinct ``worker``); see the module docs for the budget
    guarantee. The chosen configuration is the best completed trial on
    validation (:func:`choose`); its test metric is recorded, never used.

    Args:
        task: the federated task.
        name: a baseline of :data:`~baselines.REGISTRY`, e.g. ``"tpe+hyperband"``,
            or a :class:`~baselines.Baseline`.
        budget_rounds: total communication rounds of all trials; at least
            ``task.num_rounds`` (one trial).
        budget_examples: optional total client examples of all trials.
        seed: the engine seed of every trial and the samplers' seed.
        storage: ``None`` (in memory), an ``optuna.storages.BaseStorage``, an
            RDB URL (``sqlite:///x.db``, ``postgresql://...``) or a journal
            file path (see :func:`fathom_tune.open_storage`).
        space: the search space, within ``task.bounds`` (default: the bounds,
            FATHOM's search space).
        worker: distinguishes the sampler streams of parallel workers.
        checkpoint_dir: an existing directory shared by the study's workers,
            for crash-safe trials: each run checkpoints at every evaluation
            round, a retried trial continues from its checkpoint, and the
            best trial's final model stays there, so ``params`` survives a
            restart (see :class:`~baselines.Objective`).
        heartbeat: ``(interval, grace_period)`` seconds of Optuna's trial
            heartbeat, used when ``storage`` is an RDB URL: a trial of a
            killed worker is failed and retried after ``grace_period``
            (see the module docs). ``None`` turns it off.
        progress: show a progress bar of the budget's rounds.

    Raises:
        ValueError: unknown ``name`` (the message lists valid names), a
            budget smaller than one trial, a ``space`` outside the task's
            bounds, a bad ``heartbeat`` or ``checkpoint_dir``, a storage that
            cannot be opened. Nothing is written then.
        ImportError: ``"gp..."`` without torch (install ``fathom-tune[gp]``).

    Returns:
        A :class:`~fathom_tune.tuners.TuningResult`: ``history`` has one row
        per trial (:attr:`fathom_tune.record.RunRecord.steps`), ``hparams``
        and the metrics are the chosen trial's, ``params`` its final model
        when this call ran it or its checkpoint holds it, ``cost`` the sum
        over every trial of the study.

    Example:
        >>> import fathom_tune, baselines
        >>> task = fathom_tune.tasks.digits().replace(num_rounds=4, eval_every=2)
        >>> out = baselines.run(task, "random", budget_rounds=10, seed=0)
        >>> len(out.study.trials), out.cost.rounds
        (2, 8)
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
    baseline = name if isinstance(name, Baseline) else get(name)
    seed = checks.seed("seed", seed)
    worker = checks.seed("worker", worker)
    space = check_space(space, task)
    budget_rounds = checks.positive_int("budget_rounds", budget_rounds)
    if budget_rounds < task.num_rounds:
        raise ValueError(
            f"budget_rounds={budget_rounds} is smaller than one trial: task {task.name!r} "
            f"runs num_rounds={task.num_rounds} rounds per trial; allowed: >= {task.num_rounds}"
        )
    if budget_examples is not None:
        budget_examples = checks.positive_int("budget_examples", budget_examples)
    baseline.check_available()
    budget = Budget(
        task,
        space,
        seed=seed,
        rounds=budget_rounds,
        examples=budget_examples,
        max_trials=baseline.sampler.max_trials(),
    )
    if budget.examples is not None and budget.examples < budget.cheapest:
        raise ValueError(
            f"budget_examples={budget.examples} is smaller than the cheapest trial in the search "
            f"space ({budget.cheapest} client examples); allowed: >= {budget.cheapest}"
        )

    def on_start(trial: optuna.Trial, hparams: HParams) -> None:
        trial.set_user_attr(record.WORKER, worker)
        budget.admit(trial, hparams)

    _check_heartbeat(heartbeat)
    objective = Objective(task, seed=seed, space=space, on_start=on_start, checkpoint_dir=checkpoint_dir)
    opened = open_storage(storage, heartbeat=heartbeat)  # the first thing that may write
    study = _open_study(opened, task, baseline, seed, worker, space, budget)
    spent = _spent(study).rounds
    _log.info("%s: %d of %d rounds spent, worker %d", study.study_name, spent, budget_rounds, worker)
    bar = tqdm(total=budget_rounds, initial=spent, desc=study.study_name, unit="round", disable=not progress)

    def after_trial(trial: FrozenTrial) -> None:
        bar.update(record.step_cost(trial).rounds)
        objective.remove_beaten(study)  # now that the trial is told (see remove_beaten)
        best = choose(study)
        if best is not None:
            bar.set_postfix({task.target.metric: f"{best.value:.4f}"})

    with bar:
        for trial in _interrupted(study, worker):  # admitted before the interrupt: run them first
            _log.info("%s: continuing interrupted trial %d", study.study_name, trial.number)
            if not _run_trial(study, trial, objective, after_trial):
                break
        while budget.stop_reason(study) is None:
            with warnings.catch_warnings():  # the heartbeat runs around each trial, as optimize's does
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask()
            if not _run_trial(study, trial, objective, after_trial):
                break

    chosen = choose(study)  # the latest worker to finish leaves the final choice
    validation = {}
    if chosen is not None:
        study.set_user_attr(record.CHOSEN_TRIAL, chosen.number)
        last = (chosen.user_attrs.get(record.EVALS) or [{}])[-1]
        validation = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    record.write_outcome(
        study,
        hparams=None if chosen is None else HParams(**{n: chosen.params[n] for n in NAMES}),
        validation=validation,
        test={} if chosen is None else chosen.user_attrs.get(record.TEST, {}),
        ledger=_spent(study),
    )
    params = None if chosen is None else objective.final_model(study, chosen)
    return result_from_record(record.read_run(study), params=params)


def _interrupted(study: optuna.Study, worker: int) -> list[optuna.Trial]:
    """This worker's trials that an interrupt left RUNNING, to be continued in place."""
    return [
        resume_trial(study, t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(record.INTERRUPTED) and t.user_attrs.get(record.WORKER) == worker
    ]


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective, after_trial) -> bool:
    """Runs and tells one trial; False when the budget refused it (the worker stops).

    An interrupt (``KeyboardInterrupt``; the command lines turn SIGTERM into
    one) leaves the trial RUNNING and marked :data:`fathom_tune.record.INTERRUPTED`
    with its reservation: the same worker continues it in place on its next
    call, with the same number, hyperparameters and intermediate values, from
    its checkpoint, so the study ends as an uninterrupted one would. A killed
    worker's trial goes the heartbeat's way instead (failed, then retried).
    """
    state, value = TrialState.COMPLETE, None
    with trial_heartbeat(study, trial):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except NotRun:
            study.tell(trial, state=TrialState.FAIL)
            return False
        except KeyboardInterrupt:
            trial.set_user_attr(record.INTERRUPTED, True)
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
    frozen = study.tell(trial, value) if state == TrialState.COMPLETE else study.tell(trial, state=state)
    after_trial(frozen)
    return True


def _spent(study: optuna.Study) -> Cost:
    return sum((record.step_cost(t) for t in study.get_trials(deepcopy=False)), Cost())


def _open_study(opened, task: Task, baseline: Baseline, seed: int, worker: int, space: Bounds, budget: Budget):
    """The study ``<task>/<baseline>/seed<k>``, created or continued, with its header written."""
    sname = record.study_name(task.name, baseline.name, seed)
    direction = "maximize" if task.target.mode == "max" else "minimize"
    sampler = PerTrialSeed(
        lambda stream: baseline.sampler.build(space, seed=seed, stream=stream), name=baseline.name, worker=worker
    )
    study = optuna.create_study(
        storage=opened,
        study_name=sname,
        direction=direction,
        sampler=sampler,
        pruner=baseline.build_pruner(task),
        load_if_exists=True,
    )
    record.write_header(
        study,
        task=task.name,
        tuner=baseline.name,
        seed=seed,
        unit="run",
        target=task.target,
        rounds_per_run=task.num_rounds,
        budget_rounds=budget.rounds,
        budget_examples=budget.examples,
        config=baseline.describe(),
        objective=f"val_{task.target.metric}",  # each trial's final validation value
    )
    return study
