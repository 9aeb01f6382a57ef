"""The run record's reader: any study written through :mod:`fathom_tune.record`, as one record.

Use it through :mod:`fathom_tune.record` (``read_run``, ``load_runs``, ``RunRecord``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import optuna
import pandas as pd

from fathom_tune.engine import Cost
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.storage.record import (
    _COST_FIELDS,
    _NAME,
    BUDGET_EXAMPLES,
    BUDGET_ROUNDS,
    CONFIG,
    COST,
    DIVERGED,
    EVALS,
    HPARAMS,
    LEDGER,
    REJECTED,
    ROUNDS_PER_RUN,
    SEED,
    STALE,
    TARGET_METRIC,
    TARGET_MODE,
    TARGET_VALUE,
    TASK,
    TEST,
    TUNER,
    UNIT,
    VALIDATION,
    WALL,
    diverged,
    rejected,
    step_cost,
)
from fathom_tune.task import Target

__all__ = ["RunRecord", "load_runs", "read_run"]


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One tuner's run as the storage holds it, the same for every tuner.

    Attributes:
        study: the Optuna study.
        task, tuner, seed: from the study's header.
        unit: what one trial is (``"round"`` or ``"run"``).
        target: the task's target.
        rounds_per_run: rounds of one training run.
        budget_rounds, budget_examples: the tuning budget.
        config: the tuner's settings.
        steps: one row per trial in number order: ``number``, ``state``, the
            three hyperparameters, the cost fields (``rounds``, ``examples``,
            ``steps``, ``bytes_down``, ``bytes_up``, ``seconds``), ``value``,
            ``reached`` (an evaluation of the trial met the target),
            ``diverged``, ``rejected`` (why the round was rejected:
            ``"non-finite"``, ``"blow-up"``, or None; a diverged round is
            rejected), every other scalar user attr, and the cumulative
            ``cum_rounds`` / ``cum_examples`` of the whole run up to it.
        evaluations: one row per validation evaluation, in the order spent:
            ``number`` (the trial), cumulative ``rounds`` and ``examples``,
            and ``val_<metric>`` columns.
        ledger: what the whole run spent (the tuner's own ledger; the sum
            over trials while the run has not finished).
        hparams: the hyperparameters the tuner returns, or None.
        validation, test: metrics of the model the tuner returns.
        wall_seconds, compile_seconds: what the run took (:data:`WALL`); the
            ledger's seconds while no tuner recorded it.
    """

    study: optuna.Study
    task: str
    tuner: str
    seed: int
    unit: str
    target: Target
    rounds_per_run: int | None
    budget_rounds: int | None
    budget_examples: int | None
    config: dict
    steps: pd.DataFrame
    evaluations: pd.DataFrame
    ledger: Cost
    hparams: HParams | None
    validation: dict
    test: dict
    wall_seconds: float
    compile_seconds: float

    @property
    def rejected_rounds(self) -> int:
        """Trials whose round was rejected (non-finite or blown up; see ``steps["rejected"]``)."""
        return int(self.steps[REJECTED].notna().sum()) if len(self.steps) else 0

    @property
    def spent_steps(self) -> int:
        """Trials that spent something (a round, or a run's rounds)."""
        return int((self.steps["rounds"] > 0).sum())

    def cost_to_target(self, target: Target | None = None) -> tuple[int | None, int | None]:
        """Cumulative rounds and client examples at the first evaluation meeting ``target``."""
        target = target or self.target
        col = f"val_{target.metric}"
        if col in self.evaluations:
            for row in self.evaluations.itertuples(index=False):
                value = float(getattr(row, col))
                if target.reached(value):
                    return int(row.rounds), int(row.examples)
        return None, None


def _target(study: optuna.Study) -> Target:
    attrs = study.user_attrs
    if TARGET_METRIC not in attrs:
        raise ValueError(
            f"study {study.study_name!r} has no {TARGET_METRIC!r} user attr: it was not "
            "written through fathom_tune.record"
        )
    return Target(attrs[TARGET_METRIC], attrs[TARGET_VALUE], attrs[TARGET_MODE])


def read_run(study: optuna.Study) -> RunRecord:
    """The :class:`RunRecord` of any study written through this module.

    Raises:
        ValueError: the study has no header (:func:`write_header`).
    """
    attrs = study.user_attrs
    target = _target(study)
    col = f"val_{target.metric}"
    rows, evals = [], []
    spent = Cost()
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        cost = step_cost(t)
        reached = False
        for e in [] if t.user_attrs.get(STALE) else t.user_attrs.get(EVALS) or []:
            evals.append(
                {
                    "number": t.number,
                    **e,
                    "rounds": spent.rounds + int(e["rounds"]),
                    "examples": spent.examples + int(e["examples"]),
                }
            )
            reached = reached or target.reached(float(e.get(col, math.nan)))
        spent = spent + cost
        extra = {k: v for k, v in t.user_attrs.items() if k not in (COST, EVALS) and isinstance(v, (numbers.Real, str))}
        rows.append(
            {
                **extra,
                "number": t.number,
                "state": t.state.name,
                **{n: t.params.get(n, math.nan) for n in NAMES},
                **cost.as_dict(),
                "value": t.value if t.values is not None and len(t.values) == 1 else math.nan,
                "reached": reached,
                DIVERGED: diverged(extra),
                REJECTED: rejected(t.user_attrs),
                "cum_rounds": spent.rounds,
                "cum_examples": spent.examples,
            }
        )
    head = ["number", "state", *NAMES, *_COST_FIELDS, "value", "reached", DIVERGED, REJECTED]
    steps = pd.DataFrame(rows)
    # the trials' own attributes after the fixed columns, by name: storages list them in
    # different orders, the record does not
    steps = steps[head + sorted(c for c in steps.columns if c not in head)] if rows else pd.DataFrame(columns=head)
    evaluations = pd.DataFrame(evals)
    if not evals:
        evaluations = pd.DataFrame(columns=["number", "rounds", "examples", col])
    ledger = attrs.get(LEDGER)
    hparams = attrs.get(HPARAMS)
    m = _NAME.match(study.study_name)
    wall = attrs.get(WALL) or {}
    ledger = spent if ledger is None else Cost(**ledger)
    return RunRecord(
        study=study,
        task=attrs.get(TASK, m["task"] if m else ""),
        tuner=attrs.get(TUNER, m["tuner"] if m else ""),
        seed=int(attrs.get(SEED, m["seed"] if m else 0)),
        unit=attrs.get(UNIT, "run"),
        target=target,
        rounds_per_run=attrs.get(ROUNDS_PER_RUN),
        budget_rounds=attrs.get(BUDGET_ROUNDS),
        budget_examples=attrs.get(BUDGET_EXAMPLES),
        config=attrs.get(CONFIG) or {},
        steps=steps,
        evaluations=evaluations,
        ledger=ledger,
        hparams=None if hparams is None else HParams(**hparams),
        validation=attrs.get(VALIDATION) or {},
        test=attrs.get(TEST) or {},
        wall_seconds=float(wall.get("seconds", ledger.seconds)),
        compile_seconds=float(wall.get("compile_seconds", math.nan)),
    )


def load_runs(storage, task_name: str, *, tuners=None, seeds=None) -> list[RunRecord]:
    """Every recorded run of ``task_name`` in ``storage``, in ``tuners`` order, then by seed.

    Args:
        storage: an Optuna storage, RDB URL or journal file path.
        task_name: the task whose ``<task>/<tuner>/seed<k>`` studies to read.
        tuners: keep only these tuners (default: all, by name).
        seeds: keep only these seeds (default: all).
    """
    from fathom_tune.storage import open_storage

    opened = open_storage(storage)
    out = []
    for s in optuna.get_all_study_summaries(opened, include_best_trial=False):
        m = _NAME.match(s.study_name)
        if m is None or m["task"] != task_name or not s.n_trials or TARGET_METRIC not in s.user_attrs:
            continue
        if (tuners is not None and m["tuner"] not in tuners) or (
            seeds is not None and int(m["seed"]) not in seeds
        ):
            continue
        out.append(read_run(optuna.load_study(study_name=s.study_name, storage=opened)))
    order = list(tuners or [])

    def key(r: RunRecord):
        return (order.index(r.tuner) if r.tuner in order else len(order), r.tuner, r.seed)

    return sorted(out, key=key)
