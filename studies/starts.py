"""Starting points of a comparison and its reference, static FedAvg: "versus not tuning".

``python -m studies.compare --starts default eta/10 eta*10 B=4 B=256`` runs
every tuner from each start: the task's ``init_hparams`` replaced by the
start (clipped to the task's bounds; FedEx centres its arms on it), and
static FedAvg from the same start (:data:`REFERENCE`, the tuner
:class:`StaticFedAvg`), recorded in the same storage as every run. A start
other than ``default`` is kept apart by the task name of its studies,
``<task>@<start>`` (:func:`study_task`), so the default start's studies keep
their names ``<task>/<tuner>/seed<k>``.

The report's "versus not tuning" table (:func:`versus`) is read from the
storage alone: per start and tuner, the rounds to target (``k/n`` seeds
reached) and the returned model's test metric next to static FedAvg's from
the same start, with every *loss* flagged: the tuner's mean test metric is
worse than static FedAvg's by more than :func:`margin` (1 point of accuracy),
or static FedAvg reached the target on a seed where the tuner did not.
"""

from __future__ import annotations

import dataclasses
import math

import optuna
import pandas as pd

import fathom_tune
from fathom_tune import Cost, HParams, record
from fathom_tune.hparams import NAMES
from fathom_tune.tuners import Tuner, result_from_record
from studies._cli import STARTS

__all__ = ["REFERENCE", "STARTS", "StaticFedAvg", "margin", "start_task", "starts", "study_task", "versus"]

_SUFFIX = {"default": "", "eta/10": "@eta*0.1", "eta*10": "@eta*10", "B=4": "@B=4", "B=256": "@B=256"}
"""Each start's suffix of the task name in its study names (no ``/``: study names split on it)."""
REFERENCE = "fedavg"
"""The tuner name of static FedAvg's studies: ``<task>[@<start>]/fedavg/seed<k>``."""


def starts(task) -> dict:
    """The starts, label -> hyperparameters, each clipped to the task's bounds."""
    d = task.init_hparams
    values = (
        d,
        dataclasses.replace(d, learning_rate=d.learning_rate / 10),
        dataclasses.replace(d, learning_rate=d.learning_rate * 10),
        dataclasses.replace(d, batch_size=4.0),
        dataclasses.replace(d, batch_size=256.0),
    )
    return {label: task.bounds.clip(v) for label, v in zip(STARTS, values)}


def study_task(task_name: str, label: str) -> str:
    """The task name of the studies run from start ``label``.

    >>> study_task("digits", "default"), study_task("digits", "eta/10"), study_task("digits", "B=4")
    ('digits', 'digits@eta*0.1', 'digits@B=4')
    """
    return task_name + _SUFFIX[label]


def start_task(task, label: str):
    """``task`` run from start ``label``: its ``init_hparams`` the start, its name :func:`study_task`."""
    return task.replace(init_hparams=starts(task)[label], name=study_task(task.name, label))


def margin(target, static: float) -> float:
    """How much worse than static FedAvg's test metric counts as a loss: 1 point (0.01) of a
    metric that is a fraction (accuracy: target in [0, 1], higher is better), else 1 % of
    static FedAvg's value (e.g. a loss or perplexity).

    >>> from fathom_tune import Target
    >>> margin(Target("accuracy", 0.9), 0.8), margin(Target("loss", 2.0, "min"), 3.0)
    (0.01, 0.03)
    """
    if target.mode == "max" and 0 <= target.value <= 1:
        return 0.01
    return 0.01 * abs(static)


class StaticFedAvg(Tuner):
    """Static FedAvg from the task's ``init_hparams``, one run of ``task.num_rounds`` rounds,
    recorded as a one-run tuner's run is (``unit = "round"``: one trial per round). Not
    registered (``--tuners`` does not list it): the comparison runs it as the reference. A
    finished study is read back; one cut off before its outcome is run again."""

    name = REFERENCE

    def tune(self, request):
        task, seed = request.task, request.seed
        name = request.study_name(self.name)
        storage = fathom_tune.open_storage(request.storage)
        if storage is not None:
            held = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}.get(name)
            if held is not None and record.LEDGER in held.user_attrs:
                study = optuna.load_study(study_name=name, storage=storage)
                return result_from_record(record.read_run(study))
            if held is not None:
                optuna.delete_study(study_name=name, storage=storage)
        out = fathom_tune.fedavg(task, seed=seed, progress=f"{self.name} {task.name}" if request.progress else False)
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        record.write_header(
            study, task=task.name, tuner=self.name, seed=seed, unit="round", target=task.target,
            rounds_per_run=task.num_rounds, budget_rounds=task.num_rounds,
            config=task.init_hparams.as_dict(), objective="train_loss",
        )
        record.add_trials(study, _round_trials(out.history, task))
        record.write_outcome(
            study, hparams=task.init_hparams, validation=out.validation_metrics, test=out.test_metrics,
            ledger=out.cost,
        )
        return dataclasses.replace(out, study=study)


def _round_trials(history: pd.DataFrame, task) -> list:
    """One trial template per round of a static run's ``history`` (whose costs are cumulative)."""
    counts = ("rounds", "examples", "steps", "bytes_down", "bytes_up")
    distributions = record.log_distributions(task.bounds)
    metrics = [c[len("val_") :] for c in history.columns if c.startswith("val_")]
    trials, before = [], dict.fromkeys((*counts, "seconds"), 0)
    for row in history.to_dict("records"):
        cost = Cost(**{f: int(row[f] - before[f]) for f in counts}, seconds=float(row["seconds"] - before["seconds"]))
        before = {f: row[f] for f in before}
        val = {m: row[f"val_{m}"] for m in metrics if not math.isnan(row[f"val_{m}"])}
        trials.append(record.round_trial(
            round_index=int(row["round"]), hparams=HParams(**{n: float(row[n]) for n in NAMES}),
            distributions=distributions, value=float(row["train_loss"]) if row["accepted"] else None,
            cost=cost, evals=[record.evaluation(1, cost.examples, val)] if val else [],
            **{record.LOCAL_STEPS: int(row["local_steps"])},
        ))
    return trials


def _spread(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "never"
    if len(values) == 1:
        return f"{values.iloc[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.2g}"


SHOWN = 9
"""The columns of :func:`versus` that the report's table shows."""


def versus(seeds: pd.DataFrame, target) -> pd.DataFrame:
    """Per start and tuner, against static FedAvg from the same start.

    ``seeds``: :func:`studies.report.per_seed` rows of every start's runs with a
    ``start`` column, static FedAvg's (tuner :data:`REFERENCE`) among them.
    Numbers are means over the seeds (rounds to target: over those that
    reached it); ``loss`` says why a row is a loss, or is empty. The first
    :data:`SHOWN` columns are the report's table, the others the figure's numbers.
    """
    metric = f"test_{target.metric}"
    sign = 1.0 if target.mode == "max" else -1.0
    rows = []
    for start, g in seeds.groupby("start", sort=False):
        static = g[g["tuner"] == REFERENCE].set_index("seed")
        for tuner, mine in g[g["tuner"] != REFERENCE].groupby("tuner", sort=False):
            mine = mine.set_index("seed")
            ref = static.reindex(mine.index)
            test, ref_test = mine[metric].mean(), ref[metric].mean()
            worse, allowed = sign * (ref_test - test), margin(target, ref_test)
            why = []
            if math.isfinite(worse) and worse > allowed:
                points = margin(target, 0.0) == 0.01  # a fraction: in points of it
                by = f"{100 * worse:.1f} points" if points else f"{worse:.4g} (> 1 %)"
                why.append(f"test {target.metric} {by} worse than static FedAvg's")
            missed = [s for s in mine.index if bool(ref.loc[s, "reached"]) and not bool(mine.loc[s, "reached"])]
            if missed:
                why.append(f"static reached the target, the tuner did not (seed {', '.join(map(str, missed))})")
            rows.append({
                "start": start,
                "tuner": tuner,
                "reached": f"{int(mine['reached'].sum())}/{len(mine)}",
                "rounds to target": _spread(mine["rounds_to_target"]),
                f"test {target.metric}": test,
                "static reached": f"{int(ref['reached'].sum())}/{len(ref)}",
                "static rounds to target": _spread(ref["rounds_to_target"]),
                f"static test {target.metric}": ref_test,
                "loss": "; ".join(why),
                "loss_test": bool(math.isfinite(worse) and worse > allowed),
                "loss_target": bool(missed),
                "rounds_to_target_mean": mine["rounds_to_target"].mean(),
                "static_rounds_to_target_mean": ref["rounds_to_target"].mean(),
                "n_reached": int(mine["reached"].sum()),
                "static_n_reached": int(ref["reached"].sum()),
                "seeds": len(mine),
            })
    return pd.DataFrame(rows)
