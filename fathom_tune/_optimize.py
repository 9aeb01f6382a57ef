"""``fathom_tune.optimize``: one FedAvg run tuned by FATHOM, recorded as an Optuna study.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). Every communication round is one Optuna trial: the
:class:`~fathom_tune.FathomSampler` suggests the round's hyperparameters from
the study's earlier rounds, the engine runs the round, and the round's
hypergradients ``G`` (from the clients) and ``H`` (from the server's moving
average of updates) are told back with the training loss as the value.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optuna
import pandas as pd

from fathom_tune import __version__  # set in the package __init__ before this import
from fathom_tune._hparams import HParams
from fathom_tune._hypergrad import FathomConfig, ServerTracker
from fathom_tune._sampler import FathomSampler, report_divergence, report_round
from fathom_tune._storage import open_storage
from fathom_tune.engine import Cost, Engine, RoundResult, ServerState
from fathom_tune.loop import Outcome, rounds_to_target, run
from fathom_tune.task import Target, Task, check_positive_int

__all__ = ["OptimizeResult", "make_study_name", "optimize"]

TUNER = "fathom"


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
    """The loop's schedule: ask a trial per round, tell it with G, H and the loss."""

    def __init__(self, study: optuna.Study, sampler: FathomSampler, params):
        self.study = study
        self.sampler = sampler
        self.tracker = ServerTracker.init(params)
        self.trial: optuna.Trial | None = None

    def propose(self, round_index: int) -> HParams:
        self.trial = self.study.ask()  # trial number == round index
        return self.sampler.suggest(self.trial)

    def observe(self, result: RoundResult, metrics, accepted: bool) -> Outcome:
        trial = self.trial
        trial.set_user_attr("local_steps", int(result.local_steps.sum()))
        trial.set_user_attr("examples", int(result.cost.examples))
        if not accepted:
            report_divergence(trial)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return Outcome(record={"H": math.nan, "diverged": True})
        h, tracker = _server_step(self.tracker, result.update, self.sampler.config.alpha)
        self.tracker = tracker
        h = float(h)
        report_round(trial, G=result.local_hypergradient, H=h)
        for k, v in (metrics or {}).items():
            trial.set_user_attr(f"val_{k}", v)
        self.study.tell(trial, result.train_loss)
        return Outcome(record={"H": h, "diverged": False})


def optimize(
    task: Task,
    *,
    config: FathomConfig | None = None,
    seed: int = 0,
    num_rounds: int | None = None,
    eval_every: int | None = None,
    storage=None,
    study_name: str | None = None,
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
        study_name: default ``<task>/fathom/seed<seed>``. The study must not
            hold rounds already (a run cannot resume without its model).
        progress: show a progress bar.
        **engine_kwargs: passed to :class:`~fathom_tune.engine.Engine`
            (``server_optimizer``, ``buckets``, ``client_block``, ...).

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        TypeError, ValueError: for bad arguments, before anything is written.

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
    opened = open_storage(storage)
    sampler = FathomSampler(init=init, bounds=bounds, config=config, seed=seed)
    if opened is not None:
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(opened)}
        if existing.get(name):
            raise ValueError(
                f"study_name={name!r} already holds {existing[name]} rounds in this storage; "
                "a FATHOM run cannot continue without its model, so choose another study_name "
                "or storage"
            )
    study = optuna.create_study(
        storage=opened, study_name=name, sampler=sampler, direction="minimize", load_if_exists=True
    )
    for key, value in {
        "task": task.name,
        "tuner": TUNER,
        "seed": seed,
        "budget_rounds": num_rounds,
        "version": __version__,
        "target_metric": task.target.metric,
        "target_value": task.target.value,
        "target_mode": task.target.mode,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("init", "bounds")},
    }.items():
        study.set_user_attr(key, value)
    state = engine.init()
    schedule = _FathomSchedule(study, sampler, state.params)
    out = run(
        engine,
        schedule,
        num_rounds=num_rounds,
        eval_every=eval_every,
        state=state,
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
