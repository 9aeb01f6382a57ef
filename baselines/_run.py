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

from baselines._registry import Baseline, get
from baselines._study import choose, run_study
from fathom_tune.hparams import Bounds
from fathom_tune.task import Task
from fathom_tune.tuners import TuningResult

__all__ = ["choose", "run"]


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
    return run_study(
        task,
        baseline,
        budget_rounds=budget_rounds,
        budget_examples=budget_examples,
        seed=seed,
        storage=storage,
        space=space,
        worker=worker,
        checkpoint_dir=checkpoint_dir,
        heartbeat=heartbeat,
        progress=progress,
    )
