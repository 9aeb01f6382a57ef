"""The one objective every baseline optimizes: a full static-hyperparameter FedAvg run.

A trial suggests the three client hyperparameters that FATHOM ("Federated
Hypergradient Descent", A. K. Kan, arXiv 2211.02106) tunes, ``learning_rate``,
``local_epochs`` and ``batch_size``, as log-scale floats within the search
space (by default the task's bounds, exactly FATHOM's search space), then runs
FedAvg with them through the project's one round loop,
``fathom_tune.loop.run(Engine(task, seed=seed), Static(hparams, on_eval=...))``.
At every evaluation round the validation value of the task's target metric is
reported with ``trial.report(value, rounds_run)`` and ``trial.should_prune()``
may end the run; the run's ledger goes into the trial's user attributes.

Each trial is recorded through :mod:`fathom_tune.record` (the storage is the
record; reports read it back with :func:`fathom_tune.record.read_run`):

* ``cost``: the run's :class:`~fathom_tune.engine.Cost` (partial for a
  pruned or diverged run);
* ``evals``: one entry per evaluation with the trial's cumulative rounds and
  client examples at that evaluation;
* ``diverged``: whether the run stopped at a non-finite round;
* ``test``: the test metrics of the run's final model, recorded only for a
  completed trial that was the best on validation when it finished (so the
  model a study finally chooses always has them). Never read to choose.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import final

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fathom_tune import checks, record
from fathom_tune.engine import Cost, Engine, sample_clients
from fathom_tune.hparams import NAMES, Bounds, HParams, local_step_counts
from fathom_tune.loop import Progress, Static
from fathom_tune.loop import run as run_loop
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.task import Task

__all__ = [
    "CHECKPOINT_KIND",
    "Objective",
    "cheapest_examples",
    "check_space",
    "checkpoint_path",
    "costliest_examples",
    "origin",
    "projected_cost",
    "suggest",
]


CHECKPOINT_KIND = "baseline-trial"
"""The ``kind`` of a baseline trial's checkpoint file."""


def origin(trial: FrozenTrial) -> int:
    """The number of the trial whose run ``trial`` continues: itself, or the first it retries.

    A trial that Optuna's heartbeat found stale is failed and retried as a new
    trial with the same hyperparameters; the retry continues the original's
    checkpoint.
    """
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else trial.number


def preference(number: int, value: float, direction: optuna.study.StudyDirection) -> tuple:
    """How baselines rank finished runs (larger is preferred): better value, then lower number."""
    sign = 1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return (sign * value, -number)


def checkpoint_path(directory: pathlib.Path, trial: FrozenTrial) -> pathlib.Path:
    """Where the run of ``trial`` keeps its checkpoint: ``<directory>/trial<origin>.npz``."""
    return pathlib.Path(directory) / f"trial{origin(trial)}.npz"


def check_space(space: Bounds | None, task: Task) -> Bounds:
    """The search space: ``space`` if it lies within ``task.bounds``, the bounds when None.

    Raises:
        TypeError: ``space`` is not a :class:`~fathom_tune.Bounds`.
        ValueError: a side of ``space`` lies outside the task's bounds.

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.digits()
        >>> check_space(None, task) == task.bounds
        True
    """
    if space is None:
        return task.bounds
    if not isinstance(space, Bounds):
        raise TypeError(f"space must be a fathom_tune.Bounds or None, got {space!r}")
    for side in ("lower", "upper"):
        hp = getattr(space, side)
        if not task.bounds.contains(hp):
            lo, hi = task.bounds.lower, task.bounds.upper
            allowed = ", ".join(f"{n} in [{getattr(lo, n)!r}, {getattr(hi, n)!r}]" for n in NAMES)
            raise ValueError(
                f"space.{side}={hp!r} lies outside the bounds of task {task.name!r}; "
                f"allowed: {allowed}"
            )
    return space


def suggest(trial: optuna.Trial, space: Bounds) -> HParams:
    """Suggests the three hyperparameters on ``trial``: log-scale floats within ``space``.

    Example:
        >>> import optuna
        >>> from fathom_tune import Bounds, HParams
        >>> space = Bounds(HParams(1e-3, 0.1, 1.0), HParams(1.0, 10.0, 64.0))
        >>> hp = suggest(optuna.create_study().ask(), space)
        >>> space.contains(hp)
        True
    """
    return HParams(
        **{
            n: trial.suggest_float(n, getattr(space.lower, n), getattr(space.upper, n), log=True)
            for n in NAMES
        }
    )


def _sampled_sizes(task: Task, seed: int, num_rounds: int) -> np.ndarray:
    """``n_i`` of the clients each round samples, ``[num_rounds, clients_per_round]``.

    Uses the engine's client order (``task.train.client_ids()``) and its
    sampling rule, :func:`fathom_tune.engine.sample_clients`.
    """
    ids = list(task.train.client_ids())
    sizes = {}
    out = np.zeros((num_rounds, task.clients_per_round), np.int64)
    for r in range(num_rounds):
        for j, i in enumerate(sample_clients(seed, r, len(ids), task.clients_per_round)):
            if i not in sizes:
                sizes[i] = task.train.client_size(ids[i])
            out[r, j] = sizes[i]
    return out


def projected_cost(
    task: Task, hparams: HParams, *, seed: int, num_rounds: int | None = None
) -> Cost:
    """Rounds, client examples and local steps of a full static run, before running it.

    Client sampling is a function of ``(seed, round)``, so a run that is not
    pruned and does not diverge costs exactly this (its wall time and bytes
    are left at 0); a pruned or diverged run costs less.

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.digits()
        >>> projected_cost(task, task.init_hparams, seed=0, num_rounds=3).rounds
        3
    """
    num_rounds = checks.positive_int("num_rounds", task.num_rounds if num_rounds is None else num_rounds)
    sizes = _sampled_sizes(task, seed, num_rounds)
    steps = local_step_counts(hparams.local_epochs, sizes, hparams.batch_int)
    return Cost.of_round(steps, hparams.batch_int, rounds=num_rounds)


def cheapest_examples(task: Task, space: Bounds, *, seed: int) -> int:
    """A lower bound on the client examples of any full run within ``space``.

    A client with ``n`` examples costs ``K * B_int >= max(E * n, B_int)``, so a
    run costs at least the sum over sampled clients of
    ``ceil(max(E_low * n, B_int_low))``.
    """
    sizes = _sampled_sizes(task, seed, task.num_rounds)
    per_client = np.maximum(space.lower.local_epochs * sizes, space.lower.batch_int)
    return int(np.ceil(per_client - 1e-9).sum())


def costliest_examples(task: Task, space: Bounds, *, seed: int) -> int:
    """An upper bound on the client examples of any full run within ``space``.

    ``K * B_int = ceil(E * n / B_int) * B_int <= E * n + B_int``.
    """
    sizes = _sampled_sizes(task, seed, task.num_rounds)
    per_client = space.upper.local_epochs * sizes + space.upper.batch_int
    return int(np.ceil(per_client).sum())


def _better(a: float, b: float, direction: optuna.study.StudyDirection) -> bool:
    """Whether ``a`` is at least as good as ``b``."""
    if direction == optuna.study.StudyDirection.MAXIMIZE:
        return a >= b
    return a <= b


@final
class Objective:
    """One trial = one full static-hyperparameter FedAvg run on ``task``.

    The objective value is the final validation value of the task's target
    metric (``task.target.metric``): the metric of the model the run ends
    with (the last accepted model when a round diverged). Optimize it in the
    direction of ``task.target.mode``. A pruned run raises
    :class:`optuna.TrialPruned` after recording its partial ledger.

    Every trial of the objective uses the same engine seed, so all
    configurations start from the same model and see the same clients.

    Args:
        task: the federated task; a trial runs ``task.num_rounds`` rounds and
            evaluates every ``task.eval_every`` rounds.
        seed: the engine seed (initial model, client sampling and shuffling).
        space: the search space, within ``task.bounds`` (default: the bounds).
        on_start: called as ``on_start(trial, hparams)`` after the
            hyperparameters are suggested and before training; raising there
            ends the trial before it costs anything (the runner's budget check).
        checkpoint_dir: an existing directory for crash-safe runs: every
            evaluation round writes the run's state to
            :func:`checkpoint_path` (model, server optimizer state, round,
            ledger, history); a retry of a killed trial continues from it,
            and a completed trial's file keeps its final model while the
            trial is the best (files of beaten and pruned trials are removed).

    Attributes:
        models: ``{trial number: final params}`` of the completed trials this
            objective ran that were the best on validation when they finished
            (ties included); trials that a later one beats are dropped.

    Example:
        >>> import optuna
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.digits().replace(num_rounds=4, eval_every=2)
        >>> study = optuna.create_study(direction="maximize")
        >>> study.optimize(Objective(task, seed=0), n_trials=2)
        >>> [t.user_attrs["cost"]["rounds"] for t in study.trials]
        [4, 4]
    """

    def __init__(
        self,
        task: Task,
        *,
        seed: int = 0,
        space: Bounds | None = None,
        on_start: Callable[[optuna.Trial, HParams], None] | None = None,
        checkpoint_dir=None,
    ) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
        self.task = task
        self.space = check_space(space, task)
        self.seed = seed
        self.engine = Engine(task, seed=seed)
        if checkpoint_dir is not None:
            checkpoint_dir = pathlib.Path(checkpoint_dir)
            if not checkpoint_dir.is_dir():
                raise ValueError(
                    f"checkpoint_dir={str(checkpoint_dir)!r} is not an existing directory"
                )
        self.checkpoint_dir = checkpoint_dir
        self.on_start = on_start
        self.models: dict[int, object] = {}
        self._values: dict[int, float] = {}

    def __call__(self, trial: optuna.Trial) -> float:
        task, metric = self.task, self.task.target.metric
        hparams = suggest(trial, self.space)
        if self.on_start is not None:
            self.on_start(trial, hparams)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        pruned = False
        reported: set[int] = set(frozen.intermediate_values)  # a retry inherits its original's
        resume, on_round, path = None, None, None
        if self.checkpoint_dir is not None:
            path = checkpoint_path(self.checkpoint_dir, frozen)
            fingerprint = self._fingerprint(trial.study.study_name, hparams.as_dict())
            if path.exists():
                resume = self._load(path, fingerprint)

            def on_round(done: Progress) -> None:
                if f"val_{metric}" in done.rows[-1]:
                    ckpt.save_run(path, kind=CHECKPOINT_KIND, fingerprint=fingerprint, progress=done)

        def on_eval(round_index: int, metrics: dict[str, float]) -> bool:
            nonlocal pruned
            step = round_index + 1  # rounds this trial has run
            if step not in reported:
                trial.report(metrics[metric], step)
                reported.add(step)
            pruned = step < task.num_rounds and trial.should_prune()
            return pruned

        out = run_loop(self.engine, Static(hparams, on_eval=on_eval), resume=resume, on_round=on_round)
        history = out.history
        evals = history[history[f"val_{metric}"].notna()]
        val_cols = [c for c in history.columns if c.startswith("val_")]
        records = [
            record.evaluation(row["rounds"], row["examples"], {c[4:]: row[c] for c in val_cols})
            for _, row in evals.iterrows()
        ]
        last = records[-1]
        if last["rounds"] not in reported:  # a diverged run's final evaluation
            trial.report(last[f"val_{metric}"], last["rounds"])
        diverged = "diverged" in history and bool(history["diverged"].eq(True).any())
        record.write_step(trial, cost=out.cost, evals=records, **{record.DIVERGED: diverged})
        if pruned:
            if path is not None:
                ckpt.remove(path)
            raise optuna.TrialPruned(f"pruned after {out.cost.rounds} of {task.num_rounds} rounds")
        value = float(out.final_metrics[metric])
        if math.isfinite(value) and self._is_best_so_far(trial, value):
            trial.set_user_attr(record.TEST, self.engine.evaluate(out.params, "test"))
            direction = trial.study.direction
            for number, v in list(self._values.items()):
                if not _better(v, value, direction):
                    del self.models[number], self._values[number]
            self.models[trial.number], self._values[trial.number] = out.params, value
        if path is not None:
            self.remove_beaten(trial.study, (trial.number, path, value))
        return value

    def remove_beaten(
        self, study: optuna.Study, current: tuple[int, pathlib.Path, float] | None = None
    ) -> None:
        """Deletes every finished run's checkpoint but the one :func:`baselines.choose` would pick.

        That is the best final value, ties going to the lower trial number;
        pruned runs and runs with a non-finite value lose theirs. The
        objective calls it as its run ends, with ``current`` = ``(trial
        number, checkpoint path, value)`` of its own run (its trial is not
        told yet); :func:`baselines.run` calls it again after each trial is
        told. Two workers whose trials end together each decide before the
        other's trial is recorded, so each may keep its own checkpoint; the
        later of the two calls after the tells sees both trials and removes
        the beaten one. A no-op without ``checkpoint_dir``.
        """
        if self.checkpoint_dir is None:
            return
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        runs = [
            (
                t.number,
                checkpoint_path(self.checkpoint_dir, t),
                t.value if t.state == TrialState.COMPLETE else None,
            )
            for t in done
        ]
        if current is not None:
            runs.append(current)
        finite = [(n, v) for n, _, v in runs if v is not None and math.isfinite(v)]
        keep = max(finite, key=lambda nv: preference(*nv, study.direction))[0] if finite else None
        for number, path, _ in runs:
            if number != keep:
                ckpt.remove(path)

    def _fingerprint(self, study_name: str, hparams: dict) -> dict:
        task = self.task
        return ckpt.fingerprint(
            self.engine, study=study_name, num_rounds=task.num_rounds, eval_every=task.eval_every, hparams=hparams
        )

    def _load(self, path: pathlib.Path, fingerprint: dict) -> Progress:
        progress, _ = ckpt.load_run(path, kind=CHECKPOINT_KIND, fingerprint=fingerprint, state=self.engine.init())
        return progress

    def final_model(self, study: optuna.Study, trial: FrozenTrial):
        """The final parameters of completed ``trial``: in memory, from its checkpoint, or None."""
        if trial.number in self.models:
            return self.models[trial.number]
        if self.checkpoint_dir is None:
            return None
        path = checkpoint_path(self.checkpoint_dir, trial)
        if not path.exists():
            return None
        return self._load(path, self._fingerprint(study.study_name, dict(trial.params))).state.params

    @staticmethod
    def _is_best_so_far(trial: optuna.Trial, value: float) -> bool:
        study = trial.study
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return all(_better(value, t.value, study.direction) for t in done if t.value is not None)
