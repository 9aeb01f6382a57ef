"""The run record: one schema for every tuner's Optuna study, and one reader for all of them.

Every tuner (FATHOM, the Optuna baselines, and any tuner registered in
:mod:`fathom_tune.tuners`) records its run in an Optuna study through this
module, and every report reads runs back through :func:`read_run` without
asking which tuner wrote them. The keys below are the whole schema.

A study is named ``<task>/<tuner>/seed<k>`` (:func:`study_name`). Its
*trials* are its steps: one trial per communication round for tuners that
adapt during one run (``unit = "round"``: FATHOM), one trial per training run
for search over static hyperparameters (``unit = "run"``: the baselines).
Each trial records what it spent (:data:`COST`) and the validation
evaluations that happened in it (:data:`EVALS`), each at the rounds and
client examples the trial had spent by then. The reader adds the trials up
in number order, so the cumulative cost of every evaluation, the whole-run
ledger and the cost to a target come out the same way for every tuner.

Example:
    >>> import optuna
    >>> from fathom_tune.engine import Cost
    >>> study = optuna.create_study(study_name="digits/demo/seed0", direction="maximize")
    >>> write_header(study, task="digits", tuner="demo", seed=0, unit="run",
    ...              target=Target("accuracy", 0.9), rounds_per_run=2, budget_rounds=4)
    >>> for rounds, acc in ((2, 0.5), (2, 0.95)):
    ...     t = study.ask()
    ...     write_step(t, cost=Cost(rounds=rounds, examples=10 * rounds),
    ...                evals=[evaluation(rounds, 10 * rounds, {"accuracy": acc})])
    ...     _ = study.tell(t, acc)
    >>> run = read_run(study)
    >>> run.cost_to_target(), run.ledger.rounds, list(run.evaluations["rounds"])
    ((4, 40), 4, [2, 4])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from fathom_tune.engine import Cost
from fathom_tune.hparams import NAMES, HParams
from fathom_tune.task import Target

__all__ = [
    "BUDGET_EXAMPLES",
    "BUDGET_ROUNDS",
    "CHOSEN_TRIAL",
    "CONFIG",
    "COST",
    "DIVERGED",
    "EVALS",
    "FATHOM_DIVERGED",
    "FATHOM_G",
    "FATHOM_H",
    "FATHOM_REJECTED",
    "HPARAMS",
    "INTERRUPTED",
    "LEDGER",
    "LOCAL_STEPS",
    "NOT_RUN",
    "RESERVED_EXAMPLES",
    "RESERVED_ROUNDS",
    "ROUND",
    "ROUNDS_PER_RUN",
    "STALE",
    "TEST",
    "UNITS",
    "VALIDATION",
    "WALL",
    "WORKER",
    "RunRecord",
    "evaluation",
    "finished_rounds",
    "load_runs",
    "mark_stale",
    "read_run",
    "step_cost",
    "add_wall_time",
    "study_name",
    "write_header",
    "write_outcome",
    "write_step",
]

# ---------------------------------------------------------------- study attrs
TASK, TUNER, SEED, VERSION = "task", "tuner", "seed", "version"
TARGET_METRIC, TARGET_VALUE, TARGET_MODE = "target_metric", "target_value", "target_mode"
UNIT = "unit"
"""What one trial is: ``"round"`` (one communication round) or ``"run"`` (one training run)."""
UNITS = ("round", "run")
ROUNDS_PER_RUN = "rounds_per_run"
"""Rounds of one training run (FATHOM's whole run; each baseline trial)."""
BUDGET_ROUNDS, BUDGET_EXAMPLES = "budget_rounds", "budget_examples"
CONFIG = "config"
"""The tuner's own settings (a JSON dict), shown in reports."""
LEDGER = "ledger"
"""The whole run's :class:`~fathom_tune.engine.Cost`, written by the tuner when it finishes."""
HPARAMS = "hparams"
"""The hyperparameters the tuner returns (a dict of the three names)."""
VALIDATION, TEST = "validation", "test"
"""Validation and test metrics of the model the tuner returns (dicts)."""
WALL = "wall"
"""What the run took: ``{"seconds", "compile_seconds"}`` summed over every process that
worked on it (each :meth:`fathom_tune.tuners.Tuner.run` call adds its own, interrupted
ones too), JAX compilation included in ``seconds`` and shown apart."""

# ---------------------------------------------------------------- trial attrs
COST = "cost"
"""What the trial spent: a :class:`~fathom_tune.engine.Cost` as a dict."""
EVALS = "evals"
"""The trial's validation evaluations: ``[{"rounds", "examples", "val_<metric>"...}]``,
``rounds``/``examples`` counted from the trial's start."""
ROUND = "round"
"""The 0-based communication round a ``unit = "round"`` trial recorded."""
STALE = "stale"
"""``True`` on a trial left RUNNING by a killed process and failed when the run resumed."""
INTERRUPTED = "interrupted"
"""``True`` on a trial an interrupt (Ctrl-C, SIGTERM) left RUNNING; a re-run continues it in place."""
DIVERGED = "diverged"
"""``True`` when the trial's training hit a non-finite loss or update."""
LOCAL_STEPS = "local_steps"
"""Local SGD steps of a round, summed over its clients."""

# FATHOM's rounds (read by FathomSampler; see fathom_tune.fathom)
FATHOM_G = "fathom.G"
"""The round's local hypergradient ``G = sum_i w_i phi_i``."""
FATHOM_H = "fathom.H"
"""The round's global hypergradient ``H = cos(m, u)``."""
FATHOM_DIVERGED = "fathom.diverged"
"""``True``: the round diverged; the next round halves its learning rate."""
FATHOM_REJECTED = "fathom.rejected"
"""Trial *system* attr: why FathomSampler refused a completed round."""

# search baselines' trials (see baselines)
NOT_RUN = "not_run"
"""A trial the budget refused: ``{"reason", "budget"}``; it cost nothing."""
WORKER = "worker"
"""The index of the worker process that ran the trial."""
RESERVED_ROUNDS, RESERVED_EXAMPLES = "reserved_rounds", "reserved_examples"
"""What a running trial holds of the budget (its full cost, known before it runs)."""
CHOSEN_TRIAL = "chosen_trial"
"""Study attr of a ``unit = "run"`` study: the number of the trial it returns."""

_NAME = re.compile(r"^(?P<task>[^/]+)/(?P<tuner>[^/]+)/seed(?P<seed>\d+)$")
_COST_FIELDS = tuple(f.name for f in dataclasses.fields(Cost))


def study_name(task_name: str, tuner: str, seed: int) -> str:
    """The study naming convention, ``<task>/<tuner>/seed<k>``.

    >>> study_name("digits", "fathom", 0)
    'digits/fathom/seed0'
    """
    return f"{task_name}/{tuner}/seed{seed}"


# -------------------------------------------------------------------- writers
def _set_attrs(study: optuna.Study, attrs: dict) -> None:
    current = study.user_attrs
    for key, value in attrs.items():
        if current.get(key) != value:
            study.set_user_attr(key, value)


def write_header(
    study: optuna.Study,
    *,
    task: str,
    tuner: str,
    seed: int,
    unit: str,
    target: Target,
    rounds_per_run: int,
    budget_rounds: int,
    budget_examples: int | None = None,
    config: dict | None = None,
) -> None:
    """Records what the study is; call before its first step (idempotent)."""
    from fathom_tune import __version__

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    _set_attrs(
        study,
        {
            TASK: task,
            TUNER: tuner,
            SEED: seed,
            UNIT: unit,
            VERSION: __version__,
            TARGET_METRIC: target.metric,
            TARGET_VALUE: target.value,
            TARGET_MODE: target.mode,
            ROUNDS_PER_RUN: rounds_per_run,
            BUDGET_ROUNDS: budget_rounds,
            BUDGET_EXAMPLES: budget_examples,
            CONFIG: config or {},
        },
    )


def write_outcome(
    study: optuna.Study,
    *,
    hparams: HParams | None,
    validation: dict,
    test: dict,
    ledger: Cost,
) -> None:
    """Records what the tuner returns and what the whole run spent; call when it finishes."""
    _set_attrs(
        study,
        {
            HPARAMS: None if hparams is None else hparams.as_dict(),
            VALIDATION: _plain(validation),
            TEST: _plain(test),
            LEDGER: ledger.as_dict(),
        },
    )


def add_wall_time(study: optuna.Study, *, seconds: float, compile_seconds: float) -> None:
    """Adds one process's wall time on the run (and the part of it spent compiling)."""
    before = study.user_attrs.get(WALL) or {"seconds": 0.0, "compile_seconds": 0.0}
    study.set_user_attr(
        WALL,
        {"seconds": before["seconds"] + seconds, "compile_seconds": before["compile_seconds"] + compile_seconds},
    )


def evaluation(rounds: int, examples: int, metrics: dict) -> dict:
    """One :data:`EVALS` entry: validation ``metrics`` after ``rounds`` and ``examples``.

    >>> evaluation(5, 100, {"accuracy": 0.5})
    {'rounds': 5, 'examples': 100, 'val_accuracy': 0.5}
    """
    return {"rounds": int(rounds), "examples": int(examples), **_plain({f"val_{k}": v for k, v in metrics.items()})}


def write_step(trial, *, cost: Cost, evals: list[dict], **attrs) -> None:
    """Records a trial's cost, its evaluations (:func:`evaluation`) and further user attrs."""
    for key, value in {COST: cost.as_dict(), EVALS: list(evals), **attrs}.items():
        trial.set_user_attr(key, value)


def mark_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fails a round that a killed process left RUNNING and marks it :data:`STALE`
    (the resumed run does that round again; the stale trial counts nothing)."""
    study._storage.set_trial_user_attr(trial._trial_id, STALE, True)
    study.tell(trial.number, state=TrialState.FAIL)


def finished_rounds(study: optuna.Study, done: int, checkpoint) -> dict[int, FrozenTrial]:
    """The rounds (``unit = "round"``) the study finished, by :data:`ROUND`, checked
    against a checkpoint at round ``done``: each of rounds ``0 .. done-1`` must be there.

    Raises:
        fathom_tune.CheckpointError: a round before the checkpoint is missing
            (the checkpoint belongs with another storage).
    """
    from fathom_tune.checkpoint import CheckpointError

    finished = {
        int(t.user_attrs[ROUND]): t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if ROUND in t.user_attrs and not t.user_attrs.get(STALE)
    }
    missing = [r for r in range(done) if r not in finished]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} is at round {done} but study {study.study_name!r} has no "
            f"finished trial for rounds {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            "resume with the storage the run was started with"
        )
    return finished


def step_cost(trial: FrozenTrial) -> Cost:
    """What ``trial`` spent: zero for one that recorded nothing (not run), and for a
    :data:`STALE` one (killed; its work is redone by the resumed run, which records it)."""
    recorded = {} if trial.user_attrs.get(STALE) else trial.user_attrs.get(COST) or {}
    return Cost(**{k: recorded.get(k, 0) for k in _COST_FIELDS})


def _plain(values: dict) -> dict:
    return {k: float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v for k, v in values.items()}


# --------------------------------------------------------------------- reader
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
            ``diverged``, every other scalar user attr, and the cumulative
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
                DIVERGED: bool(extra.get(DIVERGED, False) or extra.get(FATHOM_DIVERGED, False)),
                "cum_rounds": spent.rounds,
                "cum_examples": spent.examples,
            }
        )
    head = ["number", "state", *NAMES, *_COST_FIELDS, "value", "reached", DIVERGED]
    steps = pd.DataFrame(rows)
    steps = steps[head + [c for c in steps.columns if c not in head]] if rows else pd.DataFrame(columns=head)
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
