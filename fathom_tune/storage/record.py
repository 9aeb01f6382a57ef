"""The run record's schema and writers: one schema for every tuner's Optuna study.

Every tuner (FATHOM, the Optuna baselines, and any tuner registered in
:mod:`fathom_tune.tuners`) records its run in an Optuna study through this
module, and every report reads runs back through
:func:`fathom_tune.storage.reader.read_run` without
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
    >>> from fathom_tune.storage.reader import read_run
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
import datetime
import numbers
import re
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from fathom_tune._version import __version__
from fathom_tune.engine import Cost
from fathom_tune.hparams import ClientHParams, HParams
from fathom_tune.storage.optuna_internals import set_trial_user_attr
from fathom_tune.task import Target

__all__ = [
    "BLOW_UP",
    "BUDGET_EXAMPLES",
    "BUDGET_ROUNDS",
    "CHOSEN_TRIAL",
    "CONFIG",
    "COST",
    "DIVERGED",
    "EVALS",
    "HPARAMS",
    "INTERRUPTED",
    "LEDGER",
    "LOCAL_STEPS",
    "NON_FINITE",
    "NOT_RUN",
    "REJECTED",
    "REJECTION",
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
    "add_wall_time",
    "diverged",
    "evaluation",
    "finished_rounds",
    "log_distributions",
    "mark_stale",
    "rejected",
    "round_trial",
    "step_cost",
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
REJECTED = "rejected"
"""Why a one-run tuner's safety net (:class:`fathom_tune.SafetyNet`) rejected the round:
:data:`NON_FINITE` or :data:`BLOW_UP`; absent on an accepted round. The trial FAILs."""
NON_FINITE, BLOW_UP = "non-finite", "blow-up"
"""The reasons of :data:`REJECTED`: a non-finite loss or update; a finite training loss far
above the recent accepted rounds'."""
REJECTION = "rejection"
"""What the tuner was told about a rejected round (:class:`fathom_tune.tuning.safety.Rejection`):
``{"loss", "median", "streak", "reset", "back_to"}``, ``back_to`` the last accepted round's
hyperparameters (a dict of the three names, or None); a tuner derives its next round from it."""

# A tuner's own keys live with the tuner and are named ``<tuner>.<key>``
# (FATHOM's in fathom_tune.fathom.sampler, FedEx's in fathom_tune.peers.fedex,
# FedHyper's in fathom_tune.peers.fedhyper); a tuner that marks a diverged round
# its own way names that mark ``<tuner>.diverged`` (see diverged()).

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
    from fathom_tune.storage.bulk import set_study_attrs

    current = study.user_attrs
    set_study_attrs(study, {key: value for key, value in attrs.items() if current.get(key) != value})


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
    objective: str | None = None,
) -> None:
    """Records what the study is; call before its first step (idempotent).

    ``objective`` names what a trial's value is (``study.set_metric_names``;
    the dashboard labels its plots with it), e.g. ``"train_loss"``.
    """
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
    if objective is not None and study.metric_names != [objective]:
        with warnings.catch_warnings():  # experimental in Optuna 3.2-5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective])


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


def diverged(attrs: dict) -> bool:
    """Whether a trial's user ``attrs`` mark it diverged: :data:`DIVERGED`, or a tuner's own
    mark ``<tuner>.diverged`` (FATHOM's ``fathom.diverged``, which its sampler reads).

    >>> diverged({DIVERGED: True}), diverged({"fathom.diverged": True}), diverged({"fathom.G": 0.5})
    (True, True, False)
    """
    return bool(attrs.get(DIVERGED)) or any(bool(v) for k, v in attrs.items() if k.endswith("." + DIVERGED))


def rejected(attrs: dict) -> str | None:
    """Why a trial's round was rejected: its :data:`REJECTED` reason, :data:`NON_FINITE` for
    a diverged round (:func:`diverged`) that carries none (recorded without the safety net),
    else ``None``.

    >>> rejected({REJECTED: BLOW_UP}), rejected({DIVERGED: True}), rejected({})
    ('blow-up', 'non-finite', None)
    """
    reason = attrs.get(REJECTED)
    if isinstance(reason, str) and reason:
        return reason
    return NON_FINITE if diverged(attrs) else None


def log_distributions(bounds) -> dict[str, optuna.distributions.FloatDistribution]:
    """The three hyperparameters as log-scale distributions over ``bounds``
    (the params of every ``unit = "round"`` trial)."""
    lower, upper = bounds.lower, bounds.upper
    return {
        n: optuna.distributions.FloatDistribution(getattr(lower, n), getattr(upper, n), log=True)
        for n in lower.as_dict()
    }


def round_trial(
    *,
    round_index: int,
    hparams: HParams | ClientHParams,
    distributions: dict,
    value: float | None,
    cost: Cost,
    evals: list[dict],
    started: datetime.datetime | None = None,
    completed: datetime.datetime | None = None,
    **attrs,
) -> FrozenTrial:
    """One finished round of a ``unit = "round"`` study as a trial template (for
    ``study.add_trial`` or a batch of :func:`fathom_tune.storage.bulk.add_trials`):
    the one template of every one-run tuner's rounds.

    Its params are ``hparams`` (``distributions``: :func:`log_distributions`),
    its value the round's training loss, or ``value=None`` for a diverged or
    rejected round: the trial FAILs and, unless ``attrs`` mark it the tuner's own
    way (:func:`diverged`) or name a :data:`BLOW_UP` (:data:`REJECTED`), is marked
    :data:`DIVERGED`. Its user attrs are
    :data:`ROUND`, :data:`COST`, :data:`EVALS` and ``attrs``, in that order;
    ``started``/``completed`` default to now.
    """
    user_attrs = {ROUND: int(round_index), COST: cost.as_dict(), EVALS: list(evals), **attrs}
    if value is None and not diverged(attrs) and attrs.get(REJECTED, NON_FINITE) == NON_FINITE:
        user_attrs[DIVERGED] = True
    now = datetime.datetime.now() if started is None or completed is None else None
    return FrozenTrial(
        number=0,
        trial_id=0,
        state=TrialState.FAIL if value is None else TrialState.COMPLETE,
        value=None if value is None else float(value),
        datetime_start=started or now,
        datetime_complete=completed or now,
        params=hparams.as_dict(),
        distributions=distributions,
        user_attrs=user_attrs,
        system_attrs={},
        intermediate_values={},
    )


def mark_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Fails a round that a killed process left RUNNING and marks it :data:`STALE`
    (the resumed run does that round again; the stale trial counts nothing)."""
    set_trial_user_attr(study, trial, STALE, True)
    study.tell(trial.number, state=TrialState.FAIL)


def finished_rounds(study: optuna.Study, done: int, checkpoint) -> dict[int, FrozenTrial]:
    """The rounds (``unit = "round"``) the study finished, by :data:`ROUND`, checked
    against a checkpoint at round ``done``: each of rounds ``0 .. done-1`` must be there.

    Raises:
        fathom_tune.CheckpointError: a round before the checkpoint is missing
            (the checkpoint belongs with another storage).
    """
    from fathom_tune.storage.checkpoint import CheckpointError

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
