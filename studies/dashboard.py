"""The comparison in optuna-dashboard: every run on one named measure, and the report attached.

A run's own study cannot be compared with another tuner's on the dashboard: a
FATHOM study has one trial per round whose value is the round's training
loss, a search study one trial per training run whose value is that run's
validation metric, and the compare page plots trial values against trial
*numbers* on an axis called "Objective 0". So after each comparison,
:func:`publish` writes, for every run ``<task>/<tuner>/seed<k>``, a
*companion study* read from the run record alone
(:func:`fathom_tune.record.load_runs`, the same for every tuner)::

    <task>/<tuner>/seed<k>/val_<metric> by <g> rounds   ("by round" when g = 1)

whose trial ``n`` is the run's validation metric after ``g * n`` cumulative
communication rounds of the whole tuning process (every evaluation of the
run, in the order spent). ``g`` is one grid step for the whole comparison:
the greatest common divisor of every evaluation's cumulative rounds (the
task's ``eval_every`` when runs are multiples of it), so the compare page's
x axis, the trial number, *is* cumulative rounds divided by ``g`` for every
study, and its y axis and legend carry one metric name, ``val_<metric>``
(``study.set_metric_names``). A grid point without an evaluation (trial 0, at
0 rounds, and any gap) is a FAIL trial with ``evaluation = False``, which the
dashboard's plots leave out. Each trial also records ``cum_rounds`` and
``cum_examples`` as parameters (the study page's slice plot shows the metric
against either, exactly) and user attributes, the run's trial it came from
(``run_trial``) and every other validation metric of the evaluation.

Should evaluation rounds share no useful divisor (a run stopped at an odd
round can make the exact grid one trial per round: more than :data:`MAX_TRIALS`
trials and more than :data:`MAX_FILL` empty ones per evaluation, too many to
write),
the grid step is the commonest spacing between a run's evaluations and trial
``n`` holds the last evaluation after more than ``g * (n - 1)`` and at most
``g * n`` rounds (never fewer rounds than it shows); the name then reads
``by ~<g> rounds`` and the study's ``exact_rounds`` attribute is False.

The report is attached to every run study and every companion study: the
figures and ``summary.csv`` as Optuna artifacts in a file-system artifact
store (the study page's "Study Artifacts"), and a dashboard note (the study's
"Note" page) with the summary table, how to read the companion studies and
the figures, shown from the artifact store (``/artifacts/<study id>/<artifact
id>``: a dashboard served at its default root). Start the dashboard with
``--artifact-dir`` naming that store (:func:`studies._cli.dashboard_command`
prints the command).

Everything is written idempotently: running :func:`publish` again over an
unchanged storage writes nothing; a companion study whose contents would
change (the run went on, the grid changed) is written anew, and no artifact
is uploaded twice (an artifact of the same file name is overwritten in place).
"""

from __future__ import annotations

import collections
import datetime
import math
import pathlib
import typing
import warnings

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from fathom_tune import record
from fathom_tune.record import RunRecord, load_runs

__all__ = [
    "COMPANION_OF",
    "FIGURES",
    "Grid",
    "attach_report",
    "companion_name",
    "companion_trials",
    "grid",
    "publish",
    "write_companions",
]

COMPANION_OF = "companion_of"
"""Study attr of a companion study: the name of the run study it shows."""
ROUNDS_PER_TRIAL = "rounds_per_trial"
"""Study attr of a companion study: the grid step ``g`` (trial ``n`` is at ``g * n`` rounds)."""
EXACT = "exact_rounds"
"""Study attr of a companion study: True when every trial sits exactly at ``g * n`` rounds."""
FIGURES = (
    "best_vs_rounds.png",
    "best_vs_examples.png",
    "rounds_to_target.png",
    "hparams_per_round.png",
)
"""The report's figures attached as artifacts (those the report wrote)."""
TABLES = ("summary.csv",)
MAX_FILL = 3
"""The exact grid is used while it needs at most this many empty trials per evaluation ..."""
MAX_TRIALS = 600
"""... or at most this many trials in all (each trial is one storage write)."""
_NO_TIME = datetime.datetime(2000, 1, 1)


class Grid(typing.NamedTuple):
    """Trial ``n`` of a companion study is at ``step * n`` cumulative rounds (``exact``), or
    holds the last evaluation after more than ``step * (n - 1)`` and at most ``step * n``."""

    step: int
    exact: bool


def _rounds(record: RunRecord) -> list[int]:
    return [int(r) for r in record.evaluations["rounds"]]


def grid(records: list[RunRecord]) -> Grid:
    """The one grid of a comparison's companion studies (see the module's docstring).

    >>> grid([])
    Grid(step=1, exact=True)
    """
    rounds = [r for rec in records for r in _rounds(rec) if r > 0]
    if not rounds:
        return Grid(1, True)
    step = math.gcd(*rounds)
    trials = sum(max(_rounds(rec), default=0) // step + 1 for rec in records)
    if trials <= max((MAX_FILL + 1) * len(rounds) + len(records), MAX_TRIALS):
        return Grid(step, True)
    spacing = collections.Counter(
        b - a
        for rec in records
        for a, b in zip([0, *sorted(set(_rounds(rec)))], sorted(set(_rounds(rec))))
        if b > a
    )
    common = max(spacing.values())
    return Grid(min(d for d, n in spacing.items() if n == common), False)


def companion_name(run_study: str, metric: str, g: Grid) -> str:
    """The companion study's name: next to its run study, with the grid in it.

    >>> companion_name("digits/fathom/seed0", "accuracy", Grid(5, True))
    'digits/fathom/seed0/val_accuracy by 5 rounds'
    >>> companion_name("digits/fathom/seed0", "accuracy", Grid(1, True))
    'digits/fathom/seed0/val_accuracy by round'
    >>> companion_name("digits/fathom/seed0", "accuracy", Grid(5, False))
    'digits/fathom/seed0/val_accuracy by ~5 rounds'
    """
    scale = "round" if g.step == 1 and g.exact else f"{'' if g.exact else '~'}{g.step} rounds"
    return f"{run_study}/val_{metric} by {scale}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def companion_trials(record: RunRecord, g: Grid) -> list[FrozenTrial]:
    """The companion study's trials of one run: trial ``n`` at ``g.step * n`` rounds.

    Each trial's value is the run's validation metric (the task's target metric)
    at that point; one without an evaluation there (trial 0 and gaps) is FAIL.
    """
    col = f"val_{record.target.metric}"
    ev = record.evaluations
    at: dict[int, dict] = {}
    count: collections.Counter = collections.Counter()
    for row in ev.to_dict("records"):
        n = -(-int(row["rounds"]) // g.step)  # ceil: exact on an exact grid
        at[n] = row  # the last evaluation of a grid point
        count[n] += 1
    if not at:
        return []
    last = max(at)
    high_rounds = max(g.step * last, 1)
    high_examples = max([int(r["examples"]) for r in at.values()] + [1])
    dist = {
        "cum_rounds": IntDistribution(0, high_rounds),
        "cum_examples": IntDistribution(0, high_examples),
    }
    times = {
        t.number: t.datetime_complete or t.datetime_start
        for t in record.study.get_trials(deepcopy=False)
    }
    trials, examples = [], 0
    when = min((t for t in times.values() if t is not None), default=_NO_TIME)
    for n in range(last + 1):
        row = at.get(n)
        if row is None:
            attrs = {"evaluation": False, "cum_rounds": g.step * n}
            params = {"cum_rounds": g.step * n, "cum_examples": examples}
            state, value = TrialState.FAIL, None
        else:
            examples = int(row["examples"])
            when = times.get(int(row["number"])) or when
            metrics = {k: float(v) for k, v in row.items() if k.startswith("val_") and _finite(v)}
            value = metrics.get(col)
            attrs = {
                "evaluation": True,
                "cum_rounds": int(row["rounds"]),
                "cum_examples": examples,
                "run_trial": int(row["number"]),
                **metrics,
            }
            if count[n] > 1:
                attrs["evaluations_here"] = count[n]
            params = {"cum_rounds": int(row["rounds"]), "cum_examples": examples}
            state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        trials.append(
            FrozenTrial(
                number=n,
                state=state,
                value=value,
                values=None,
                datetime_start=when,
                datetime_complete=when,
                params=params,
                distributions=dist,
                user_attrs=attrs,
                system_attrs={},
                intermediate_values={},
                trial_id=n,
            )
        )
    return trials


def _same_trials(have: list[FrozenTrial], want: list[FrozenTrial]) -> bool:
    def key(t: FrozenTrial):
        return (t.number, t.state, t.values, t.params, t.user_attrs)

    return [key(t) for t in sorted(have, key=lambda t: t.number)] == [key(t) for t in want]


def write_companions(storage, records: list[RunRecord]) -> list[str]:
    """Writes (or keeps, when unchanged) the companion study of every run; returns their names.

    A companion of the same run with another name (an earlier grid) is deleted.
    """
    from fathom_tune.storage import open_storage

    opened = open_storage(storage)
    g = grid(records)
    existing = {
        s.study_name: s.user_attrs.get(COMPANION_OF)
        for s in optuna.get_all_study_summaries(opened, include_best_trial=False)
    }
    names = []
    for rec in records:
        run = rec.study.study_name
        metric = rec.target.metric
        name = companion_name(run, metric, g)
        for other, of in existing.items():
            if of == run and other != name:
                optuna.delete_study(study_name=other, storage=opened)
        want = companion_trials(rec, g)
        if not want:
            continue
        attrs = {
            COMPANION_OF: run,
            ROUNDS_PER_TRIAL: g.step,
            EXACT: g.exact,
            "metric": f"val_{metric}",
            "target_value": rec.target.value,
        }
        direction = "maximize" if rec.target.mode == "max" else "minimize"
        if name in existing:
            study = optuna.load_study(study_name=name, storage=opened)
            if (
                study.direction.name.lower() == direction
                and study.metric_names == [f"val_{metric}"]
                and all(study.user_attrs.get(k) == v for k, v in attrs.items())
                and _same_trials(study.get_trials(deepcopy=False), want)
            ):
                names.append(name)
                continue
            optuna.delete_study(study_name=name, storage=opened)
        study = optuna.create_study(study_name=name, storage=opened, direction=direction)
        with warnings.catch_warnings():  # experimental in Optuna 3.2-5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"val_{metric}"])
        record.set_study_attrs(study, attrs)
        record.add_trials(study, want)  # one transaction for the whole companion
        names.append(name)
    return names


def _note(
    summary_md: str, records: list[RunRecord], g: Grid, title: str, report: pathlib.Path
) -> str:
    metric = records[0].target.metric
    task = records[0].task
    where = (
        f"trial n is the run's validation {metric} after {g.step}·n cumulative communication rounds"
        if g.exact
        else f"trial n is the run's last validation {metric} after more than {g.step}·(n-1) "
        f"and at most {g.step}·n cumulative communication rounds"
    )
    example = companion_name(f"{task}/<tuner>/seed<k>", metric, g)
    return "\n\n".join(
        [
            f"# {title}",
            summary_md.strip(),
            (
                f"**Like with like.** Each run `{task}/<tuner>/seed<k>` has a companion study "
                f"`{example}`: {where}, for every tuner (the rounds of a tuner that adapts during "
                "one run and the runs of a search tuner alike, in the order spent). Select the "
                "companion studies on the dashboard's *Compare* page to see them on one axis "
                f"(x: trial = cumulative rounds / {g.step}) under one metric name, `val_{metric}`; "
                "the slice plot of one companion study shows the metric against `cum_rounds` or "
                "`cum_examples` exactly."
            ),
            f"The whole report: `{report}`; the figures below are this study's artifacts.",
        ]
    )


def _figures(study_id: int, artifacts: dict[str, str]) -> str:
    return "\n\n".join(
        f"![{name}](/artifacts/{study_id}/{artifacts[name]})"
        for name in FIGURES
        if name in artifacts
    )


def _artifacts(study: optuna.Study, files: list[pathlib.Path], store) -> dict[str, str]:
    """Uploads ``files`` to ``study``; an artifact of the same file name is rewritten in place.
    Returns the artifact id of every file name."""
    have = {m.filename: m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(study)}
    for path in files:
        data = path.read_bytes()
        artifact_id = have.get(path.name)
        if artifact_id is None:
            have[path.name] = optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=study
            )
            continue
        try:
            with store.open_reader(artifact_id) as reader:
                same = reader.read() == data
        except Exception:  # noqa: BLE001 - missing from the store: write it again
            same = False
        if same:
            continue
        with path.open("rb") as f:
            store.write(artifact_id, f)
    return have


def attach_report(storage, names: list[str], report_dir, artifact_dir, note: str) -> None:
    """Attaches the report in ``report_dir`` to the studies ``names``: the figures and the
    summary table as artifacts in the file-system store ``artifact_dir``, and ``note``
    followed by the figures as each study's dashboard note (when the package optuna_dashboard is
    installed)."""
    from fathom_tune.storage import open_storage

    opened = open_storage(storage)
    report_dir = pathlib.Path(report_dir)
    files = [report_dir / f for f in (*FIGURES, *TABLES) if (report_dir / f).exists()]
    pathlib.Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir))
    try:
        import optuna_dashboard
    except ImportError:  # the dashboard extra is not installed: artifacts only
        optuna_dashboard = None
    for name in names:
        study = optuna.load_study(study_name=name, storage=opened)
        artifacts = _artifacts(study, files, store)
        if optuna_dashboard is not None:
            body = f"{note}\n\n{_figures(opened.get_study_id_from_name(name), artifacts)}\n"
            if optuna_dashboard.get_note(study) != body:
                optuna_dashboard.save_note(study, body)


def publish(
    storage, task_name: str, report_dir, artifact_dir, *, tuners=None, seeds=None
) -> list[str]:
    """After a comparison: writes the companion studies of its runs and attaches the
    report (built into ``report_dir`` by :func:`studies.report.build_report`) to every
    run study and companion study. Returns the companion studies' names."""
    from fathom_tune.storage import open_storage

    storage = open_storage(storage)
    records = load_runs(storage, task_name, tuners=tuners, seeds=seeds)
    if not records:
        return []
    names = write_companions(storage, records)
    report_dir = pathlib.Path(report_dir)
    summary = report_dir / "summary.md"
    title = f"Comparison on {task_name}: summary (mean ± sd over seeds)"
    note = _note(
        summary.read_text() if summary.exists() else "",
        records,
        grid(records),
        title,
        report_dir / "report.md",
    )
    attach_report(
        storage, [r.study.study_name for r in records] + names, report_dir, artifact_dir, note
    )
    return names
