"""A baseline's study run under its tuning budget: trials asked, run, told, and the choice.

The budget rule and its guarantees are :mod:`baselines._run`'s.
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
from baselines._seeding import PerTrialSeed
from fathom_tune import checks, record
from fathom_tune.engine import Cost
from fathom_tune.hparams import NAMES, Bounds, HParams
from fathom_tune.storage import open_storage
from fathom_tune.storage.optuna_internals import resume_trial, trial_heartbeat
from fathom_tune.task import Task
from fathom_tune.tuners import TuningResult, result_from_record

__all__ = ["choose", "run_study"]

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

def run_study(
    task: Task,
    baseline,
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
    """:func:`baselines.run` of the :class:`~baselines.Baseline` ``baseline`` (its
    arguments and errors, but for the name)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
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


def _open_study(opened, task: Task, baseline, seed: int, worker: int, space: Bounds, budget: Budget):
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
