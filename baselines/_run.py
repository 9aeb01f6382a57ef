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

import dataclasses
import datetime
import math
import warnings
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

import fathom_tune
from baselines._objective import (
    DIVERGED_ATTR,
    EVALS_ATTR,
    LEDGER_ATTRS,
    Objective,
    cheapest_examples,
    check_space,
    costliest_examples,
    ledger,
    origin,
    preference,
    projected_cost,
)
from baselines._registry import GP, get
from fathom_tune._hparams import NAMES, Bounds, HParams
from fathom_tune.engine import Cost
from fathom_tune.loop import rounds_to_target
from fathom_tune.task import Target, Task, check_positive_int

__all__ = [
    "NOT_RUN_ATTR",
    "WORKER_ATTR",
    "BaselineResult",
    "choose",
    "cost_to_target",
    "history",
    "run",
    "total_cost",
]

NOT_RUN_ATTR = "not_run"
"""Trial user attr of a trial refused by the budget: ``{"reason", "budget"}``."""

WORKER_ATTR = "worker"
"""Trial user attr: the ``worker`` index of the :func:`run` call that ran the trial."""

_RESERVED_ROUNDS = "reserved_rounds"
_RESERVED_EXAMPLES = "reserved_examples"

RETRY_WAIT = 60.0
"""Seconds a trial failed as stale keeps its reservation while its retry is not there."""


def _retries_stale_trials(study: optuna.Study) -> bool:
    """Whether the study's storage fails stale trials and retries them."""
    storage = study._storage
    return (
        isinstance(storage, BaseHeartbeat)
        and storage.get_heartbeat_interval() is not None
        and storage.get_heartbeat_stale_trial_callback() is not None
    )


def _awaiting_retry(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that look stale-failed and whose retry does not exist yet.

    A stale trial failed by Optuna's heartbeat has no recorded cost and no
    ``not_run`` mark and is not itself a retry (one retry per trial).
    """
    retried = {origin(t) for t in trials if origin(t) != t.number}
    now = datetime.datetime.now()
    return {
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and origin(t) == t.number
        and t.number not in retried
        and NOT_RUN_ATTR not in t.user_attrs
        and ledger(t).rounds == 0
        and t.datetime_complete is not None
        and (now - t.datetime_complete).total_seconds() < RETRY_WAIT
    }


def _target(study: optuna.Study) -> Target:
    attrs = study.user_attrs
    if "target_metric" not in attrs:
        raise ValueError(
            f"study {study.study_name!r} has no 'target_metric' user attr; pass target= explicitly"
        )
    return Target(attrs["target_metric"], attrs["target_value"], attrs["target_mode"])


def _ordered(study: optuna.Study) -> list[FrozenTrial]:
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def total_cost(study: optuna.Study) -> Cost:
    """The ledger summed over every trial of ``study`` (pruned ones at their partial cost)."""
    return sum((ledger(t) for t in study.get_trials(deepcopy=False)), Cost())


def _final_value(trial: FrozenTrial) -> float:
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return math.nan


def _evals(trial: FrozenTrial) -> pd.DataFrame:
    return pd.DataFrame(trial.user_attrs.get(EVALS_ATTR, []), columns=None)


def history(study: optuna.Study, target: Target | None = None) -> pd.DataFrame:
    """One row per trial, in trial-number order, computed from the storage alone.

    Columns: ``number``, ``state``, the three hyperparameters, the ledger
    (``rounds``, ``examples``, ``steps``, ``bytes_down``, ``bytes_up``,
    ``seconds``), ``val_<metric>`` (the completed run's objective value, the
    last reported value of a pruned run), ``diverged``, ``reached`` (whether
    any evaluation met the target), and ``cum_rounds`` / ``cum_examples``,
    the tuning process's totals up to and including the trial.

    Args:
        study: a baseline study.
        target: default: the study's ``target`` user attr.
    """
    target = _target(study) if target is None else target
    rows = []
    for t in _ordered(study):
        evals = _evals(t)
        col = f"val_{target.metric}"
        reached = col in evals and any(target.reached(float(v)) for v in evals[col])
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **{n: t.params.get(n, math.nan) for n in NAMES},
                **ledger(t).as_dict(),
                col: _final_value(t),
                "diverged": bool(t.user_attrs.get(DIVERGED_ATTR, False)),
                "reached": bool(reached),
            }
        )
    columns = [
        "number",
        "state",
        *NAMES,
        *LEDGER_ATTRS,
        f"val_{target.metric}",
        "diverged",
        "reached",
    ]
    out = pd.DataFrame(rows, columns=columns)
    out["cum_rounds"] = out["rounds"].cumsum()
    out["cum_examples"] = out["examples"].cumsum()
    return out


def cost_to_target(
    study: optuna.Study, target: Target | None = None
) -> tuple[int | None, int | None]:
    """Rounds and client examples the whole tuning process spent until a model first met ``target``.

    Trials are taken in number order: the full ledger of every trial before
    the first one whose validation record meets the target, plus that
    trial's rounds and examples up to its first evaluation meeting it
    (:func:`fathom_tune.loop.rounds_to_target`). Computed from the storage
    alone; running trials, which have recorded nothing yet, count 0.

    Returns:
        ``(rounds, examples)``, or ``(None, None)`` when no trial reached it.
    """
    target = _target(study) if target is None else target
    spent = Cost()
    for t in _ordered(study):
        evals = _evals(t)
        if len(evals):
            r = rounds_to_target(evals, target, "rounds")
            if r is not None:
                e = rounds_to_target(evals, target, "examples")
                return spent.rounds + r, spent.examples + e
        spent = spent + ledger(t)
    return None, None


def choose(study: optuna.Study) -> FrozenTrial | None:
    """The trial a baseline returns: the best completed trial on validation.

    Reads only trial values (the final validation metric); ties go to the
    lower trial number. ``None`` when no trial completed.
    """
    done = [
        t
        for t in _ordered(study)
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    if not done:
        return None
    return max(done, key=lambda t: preference(t.number, t.value, study.direction))


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """What a baseline returns; every field but ``params`` is read back from the storage.

    Attributes:
        study: the Optuna study (``<task>/<tuner>/seed<k>``).
        history: one row per trial, see :func:`history`.
        trial: the chosen trial (best final validation metric), or None.
        hparams: its hyperparameters, or None.
        validation_metric: its final validation value of the target metric.
        test_metric: the test value of the target metric of its final model
            (recorded, never used to choose), or None.
        params: its final model when this call ran it, else None.
        cost: the ledger summed over every trial of the study.
        rounds_to_target: rounds spent by the whole tuning process until a
            model first met the target (see :func:`cost_to_target`), or None.
        examples_to_target: the same in client examples, or None.
    """

    study: optuna.Study
    history: pd.DataFrame
    trial: FrozenTrial | None
    hparams: HParams | None
    validation_metric: float | None
    test_metric: float | None
    params: object | None
    cost: Cost
    rounds_to_target: int | None
    examples_to_target: int | None


class _NotRun(Exception):
    """A trial that the budget (or an exhausted grid) does not admit."""


class _Budget:
    """The budget rule of the module docstring, read from the storage each time."""

    def __init__(
        self,
        task: Task,
        space: Bounds,
        *,
        seed: int,
        rounds: int,
        examples: int | None,
        max_trials: int | None,
    ):
        self.task = task
        self.seed = seed
        self.rounds = rounds
        self.examples = examples
        self.max_trials = max_trials
        self.record = {"rounds": rounds, "examples": examples}
        if examples is not None:
            self.cheapest = cheapest_examples(task, space, seed=seed)
            self.costliest = costliest_examples(task, task.bounds, seed=seed)

    def committed(
        self, trials: Sequence[FrozenTrial], below: int | None = None, retrying: bool = False
    ) -> tuple[int, int]:
        """Rounds and examples of finished trials plus full reservations of running ones.

        With ``retrying`` (the storage retries stale trials), a stale-failed
        trial whose retry is not there yet still counts as running.
        """
        rounds = examples = 0
        waiting_for_retry = _awaiting_retry(trials) if retrying else set()
        for t in trials:
            if t.state.is_finished() and t.number not in waiting_for_retry:
                c = ledger(t)
                rounds, examples = rounds + c.rounds, examples + c.examples
            elif below is None or t.number < below:
                rounds += t.user_attrs.get(_RESERVED_ROUNDS, self.task.num_rounds)
                if self.examples is not None:
                    examples += t.user_attrs.get(_RESERVED_EXAMPLES, self.costliest)
        return rounds, examples

    def stop_reason(self, study: optuna.Study) -> str | None:
        """Why no further trial may start, or None."""
        with warnings.catch_warnings():  # a deliberate use, not news for every trial
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # no-op without an RDB heartbeat
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return None  # a retry, already reserved
        if self.max_trials is not None and len(trials) >= self.max_trials:
            return f"the grid's {self.max_trials} configurations have all been started"
        if any(t.user_attrs.get(NOT_RUN_ATTR, {}).get("budget") == self.record for t in trials):
            return "a trial was already refused under this budget"
        rounds, examples = self.committed(trials, retrying=_retries_stale_trials(study))
        if rounds + self.task.num_rounds > self.rounds:
            return (
                f"{self.rounds - rounds} of budget_rounds={self.rounds} left, "
                f"one trial needs {self.task.num_rounds}"
            )
        if self.examples is not None and examples + self.cheapest > self.examples:
            return (
                f"{self.examples - examples} of budget_examples={self.examples} left, "
                f"the cheapest trial needs {self.cheapest}"
            )
        return None

    def admit(self, trial: optuna.Trial, hparams: HParams) -> None:
        """Reserves ``trial``'s full cost, or finishes it unrun (raises :class:`_NotRun`)."""
        need = projected_cost(self.task, hparams, seed=self.seed)
        trial.set_user_attr(_RESERVED_ROUNDS, need.rounds)
        if self.examples is not None:
            trial.set_user_attr(_RESERVED_EXAMPLES, need.examples)
        trials = trial.study.get_trials(deepcopy=False)
        rounds, examples = self.committed(
            trials, below=trial.number, retrying=_retries_stale_trials(trial.study)
        )
        reason = None
        retry = "retry_history" in trial.study._storage.get_trial_system_attrs(trial._trial_id)
        if self.max_trials is not None and trial.number >= self.max_trials and not retry:
            reason = f"the grid's {self.max_trials} configurations have all been started"
        elif rounds + need.rounds > self.rounds:
            reason = (
                f"needs {need.rounds} rounds, {self.rounds - rounds} of "
                f"budget_rounds={self.rounds} left"
            )
        elif self.examples is not None and examples + need.examples > self.examples:
            reason = (
                f"needs {need.examples} client examples, {self.examples - examples} of "
                f"budget_examples={self.examples} left"
            )
        if reason is not None:
            trial.set_user_attr(NOT_RUN_ATTR, {"reason": reason, "budget": self.record})
            trial.study.stop()
            raise _NotRun(f"trial {trial.number} not run: {reason}")


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def run(
    task: Task,
    name: str,
    *,
    budget_rounds: int,
    budget_examples: int | None = None,
    seed: int = 0,
    storage=None,
    space: Bounds | None = None,
    worker: int = 0,
    checkpoint_dir=None,
    heartbeat: tuple[int, int] | None = (10, 30),
    progress: bool = True,
) -> BaselineResult:
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
        name: a baseline of :data:`~baselines.REGISTRY`, e.g. ``"tpe+hyperband"``.
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

    Example:
        >>> import fathom_tune, baselines
        >>> task = fathom_tune.tasks.digits().replace(num_rounds=4, eval_every=2)
        >>> out = baselines.run(task, "random", budget_rounds=10, seed=0, progress=False)
        >>> len(out.study.trials), out.cost.rounds
        (2, 8)
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
    baseline = get(name)
    seed = _check_seed("seed", seed)
    worker = _check_seed("worker", worker)
    space = check_space(space, task)
    budget_rounds = check_positive_int("budget_rounds", budget_rounds)
    if budget_rounds < task.num_rounds:
        raise ValueError(
            f"budget_rounds={budget_rounds} is smaller than one trial: task {task.name!r} "
            f"runs num_rounds={task.num_rounds} rounds per trial; allowed: >= {task.num_rounds}"
        )
    if budget_examples is not None:
        budget_examples = check_positive_int("budget_examples", budget_examples)
    if isinstance(baseline.sampler, GP):
        baseline.sampler.check_available()
    budget = _Budget(
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
        trial.set_user_attr(WORKER_ATTR, worker)
        budget.admit(trial, hparams)

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
    objective = Objective(
        task, seed=seed, space=space, on_start=on_start, checkpoint_dir=checkpoint_dir
    )
    opened = fathom_tune.open_storage(storage, heartbeat=heartbeat)  # the first thing that may write

    sname = fathom_tune.make_study_name(task.name, name, seed)
    direction = "maximize" if task.target.mode == "max" else "minimize"
    # The sampler must exist before the study; its stream needs the study's trial count.
    existing = 0
    if opened is not None:
        try:
            existing = len(
                opened.get_all_trials(opened.get_study_id_from_name(sname), deepcopy=False)
            )
        except KeyError:  # a new study
            pass
    sampler = baseline.sampler.build(space, seed=seed, stream=worker * 1_000_003 + existing)
    study = optuna.create_study(
        storage=opened,
        study_name=sname,
        direction=direction,
        sampler=sampler,
        pruner=baseline.build_pruner(task),
        load_if_exists=True,
    )
    attrs = {
        "task": task.name,
        "tuner": name,
        "seed": seed,
        "budget_rounds": budget.rounds,
        "budget_examples": budget.examples,
        "version": fathom_tune.__version__,
        "target_metric": task.target.metric,
        "target_value": task.target.value,
        "target_mode": task.target.mode,
        "trial_rounds": task.num_rounds,
    }
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)

    spent = total_cost(study).rounds
    bar = tqdm(total=budget_rounds, initial=spent, desc=sname, unit="round", disable=not progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.update(ledger(trial).rounds)
        objective.remove_beaten(study)  # now that the trial is told (see remove_beaten)
        best = choose(study)
        if best is not None:
            bar.set_postfix({task.target.metric: f"{best.value:.4f}"})
        if budget.stop_reason(study) is not None:
            study.stop()

    with bar:
        if budget.stop_reason(study) is None:
            study.optimize(
                objective, callbacks=[after_trial], catch=(_NotRun,), gc_after_trial=False
            )

    chosen = choose(study)
    test = None if chosen is None else chosen.user_attrs.get(f"test_{task.target.metric}")
    if chosen is not None:  # the latest worker to finish leaves the final choice
        study.set_user_attr("chosen_trial", chosen.number)
        for key, value in chosen.user_attrs.items():
            if key.startswith("test_"):
                study.set_user_attr(key, value)
    params = None if chosen is None else objective.final_model(study, chosen)
    rtt, ett = cost_to_target(study, task.target)
    return BaselineResult(
        study=study,
        history=history(study, task.target),
        trial=chosen,
        hparams=None if chosen is None else HParams(**{n: chosen.params[n] for n in NAMES}),
        validation_metric=None if chosen is None else float(chosen.value),
        test_metric=test,
        params=params,
        cost=total_cost(study),
        rounds_to_target=rtt,
        examples_to_target=ett,
    )
