"""The comparison report: run records -> pandas tables -> seaborn figures -> markdown/HTML.

Everything in the report is read from the Optuna storage through
:func:`fathom_tune.record.load_runs`, which gives every tuner's run the same
shape (:class:`fathom_tune.record.RunRecord`); nothing is taken from the
process that ran the studies, and nothing here asks which tuner wrote a run.
A comparison's studies are the ones named ``<task>/<tuner>/seed<k>``.

Definitions used by every table and figure:

* cumulative rounds / client examples: what the *whole tuning process* has
  spent, in the order it spent it (trials in number order: rounds of a
  one-run tuner such as FATHOM, "Federated Hypergradient Descent", A. K. Kan,
  arXiv 2211.02106; whole runs of a search tuner, each run's evaluations at
  its own cumulative cost, pruned and diverged runs included);
* best validation metric: the best validation value of the task's target
  metric over every evaluation so far;
* rounds (examples) to target: the cumulative rounds (examples) at the first
  evaluation meeting the task's target, or never;
* the returned model and its metrics: what each tuner recorded as its outcome
  (:func:`fathom_tune.record.write_outcome`).

Example:
    >>> from studies.report import build_report
    >>> # build_report("sqlite:///reports/compare.db", "digits", "reports/digits")
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import pathlib
import platform

import numpy as np
import pandas as pd

from fathom_tune.record import RunRecord, load_runs
from fathom_tune.storage import mask_url
from studies import figures
from studies._cli import dashboard_command
from studies.markdown import Doc, markdown_escape, markdown_table
from studies.starts import REFERENCE, SHOWN, study_task, versus

__all__ = [
    "build_report",
    "curves",
    "markdown_escape",
    "markdown_table",
    "per_seed",
    "summary",
]


def curves(records: list[RunRecord]) -> pd.DataFrame:
    """Best validation metric so far at each evaluation, per run (long format).

    Columns: ``tuner``, ``seed``, ``rounds``, ``examples``, ``val``, ``best``, ``reached``.
    """
    frames = []
    for r in records:
        col = f"val_{r.target.metric}"
        ev = r.evaluations
        ev = pd.DataFrame(
            {
                "rounds": ev["rounds"].astype("int64"),
                "examples": ev["examples"].astype("int64"),
                "val": ev[col].astype(float) if col in ev else np.nan,
            }
        )
        vals = ev["val"].where(np.isfinite(ev["val"]))
        best = vals.cummax() if r.target.mode == "max" else vals.cummin()
        ev = ev.assign(best=best.ffill(), tuner=r.tuner, seed=r.seed)
        ev["reached"] = [not math.isnan(v) and r.target.reached(float(v)) for v in ev["best"]]
        frames.append(ev)
    cols = ["tuner", "seed", "rounds", "examples", "val", "best", "reached"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols]


def _totals(r: RunRecord) -> dict[str, float]:
    c = r.ledger
    return {
        "rounds": c.rounds,
        "examples": c.examples,
        "bytes": c.bytes_up + c.bytes_down,
        "seconds": r.wall_seconds,
        "compile_seconds": r.compile_seconds,
    }


def per_seed(records: list[RunRecord], curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run: cost to target, the returned model's metrics, totals spent."""
    curve = curves(records) if curve is None else curve
    rows = []
    for r in records:
        ev = curve[(curve["tuner"] == r.tuner) & (curve["seed"] == r.seed)]
        hit = ev[ev["reached"]]
        metric = r.target.metric
        rows.append(
            {
                "tuner": r.tuner,
                "seed": r.seed,
                "trials": r.spent_steps,
                "rounds_to_target": float(hit["rounds"].iloc[0]) if len(hit) else math.nan,
                "examples_to_target": float(hit["examples"].iloc[0]) if len(hit) else math.nan,
                "reached": bool(len(hit)),
                f"val_{metric}": float(r.validation.get(metric, math.nan)),
                f"test_{metric}": float(r.test.get(metric, math.nan)),
                **{f"total_{k}": float(v) for k, v in _totals(r).items()},
                "budget_rounds": r.budget_rounds,
                "rounds_per_run": r.rounds_per_run,
            }
        )
    return pd.DataFrame(rows)


_MEASURES = [
    ("rounds_to_target", "rounds to target"),
    ("examples_to_target", "examples to target"),
    ("test", "test {metric} (returned model)"),
    ("total_rounds", "total rounds"),
    ("total_examples", "total examples"),
    ("total_bytes", "total MB"),
    ("total_seconds", "wall time (s)"),
    ("total_compile_seconds", "of which compiling (s)"),
]


def summary(seeds: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per tuner, mean and sd over seeds: ``(numbers, formatted for markdown)``.

    Rounds and examples to target average over the seeds that reached the
    target; ``never reached`` counts the others.
    """
    numbers, text = [], []
    for tuner, g in seeds.groupby("tuner", sort=False):
        n = len(g)
        row = {
            "tuner": tuner,
            "seeds": n,
            "reached": int(g["reached"].sum()),
            "never_reached": int(n - g["reached"].sum()),
        }
        shown = {"tuner": tuner, "seeds": n, "never reached": f"{n - int(g['reached'].sum())}/{n}"}
        for col, label in _MEASURES:
            src = f"test_{metric}" if col == "test" else col
            values = g[src].astype(float)
            if col == "total_bytes":
                values = values / 1e6
            mean, sd = values.mean(), values.std(ddof=1)
            name = src if col != "total_bytes" else "total_mb"
            row[f"{name}_mean"], row[f"{name}_sd"] = mean, sd
            shown[label.format(metric=metric)] = _pm(mean, sd, values.notna().sum())
        numbers.append(row)
        text.append(shown)
    return pd.DataFrame(numbers), pd.DataFrame(text)


def _pm(mean: float, sd: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "never" if n == 0 else "n/a"
    fmt = (lambda v: f"{v:,.0f}") if abs(mean) >= 1000 else (lambda v: f"{v:.4g}")
    if n < 2 or not math.isfinite(sd):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(sd) if abs(mean) >= 1000 else f'{sd:.2g}'}"


def _environment() -> pd.DataFrame:
    import jax

    rows = []
    for pkg in (
        "fathom-tune",
        "jax",
        "jaxlib",
        "fedjax",
        "optuna",
        "optuna-dashboard",
        "pandas",
        "seaborn",
    ):
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    rows += [
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("processor", platform.processor() or platform.machine()),
        ("CPU count", str(os.cpu_count())),
        ("JAX backend", jax.default_backend()),
        ("JAX devices", ", ".join(str(d) for d in jax.devices())),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def build_report(
    storage, task_name: str, out_dir, *, tuners=None, seeds=None, artifact_dir=None, starts=None
) -> pathlib.Path:
    """Writes the comparison report of ``task_name`` from ``storage`` into ``out_dir``.

    Files: ``report.md`` and ``report.html``; ``summary.csv``/``summary.md``
    (per tuner, mean and sd over seeds), ``per_seed.csv``/``per_seed.md``,
    ``curves.csv`` (every evaluation with cumulative cost); figures
    ``best_vs_rounds.png``, ``best_vs_examples.png``, ``hparams_per_round.png``
    (runs whose trials are rounds), ``rounds_to_target.png``.

    Args:
        storage: an Optuna storage, RDB URL or journal file path (read only).
        task_name: the task whose ``<task>/<tuner>/seed<k>`` studies to report.
        out_dir: the output directory (created if absent).
        tuners: report only these tuners, in this order (default: all).
        seeds: report only these seeds (default: all).
        artifact_dir: the artifact store the figures are attached to
            (:mod:`studies.dashboard`), named in the printed dashboard command.
        starts: the starts the comparison ran (:mod:`studies.starts`), or None.
            The report then covers the runs from the ``default`` start (else
            from the first one) and adds each tuner against static FedAvg from
            every start: ``versus.csv``/``versus.md``, ``versus_per_seed.csv``
            and ``versus_static.png``.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: the storage holds no study of ``task_name``.
    """
    title_task = task_name
    if starts:
        title_task = study_task(task_name, "default" if "default" in starts else starts[0])
    records = load_runs(storage, title_task, tuners=tuners, seeds=seeds)
    if not records:
        raise ValueError(f"storage holds no study named {title_task}/<tuner>/seed<k> with trials")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = records[0].target
    metric = target.metric
    curve = curves(records)
    seeds_df = per_seed(records, curve)
    numbers, shown = summary(seeds_df, metric)
    curve.to_csv(out / "curves.csv", index=False)
    seeds_df.to_csv(out / "per_seed.csv", index=False)
    numbers.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(shown) + "\n")
    (out / "per_seed.md").write_text(markdown_table(seeds_df) + "\n")

    run_length = records[0].rounds_per_run
    rounds_label = "cumulative communication rounds (all tuning)"
    figures.best_so_far(curve, records, "rounds", rounds_label, target, run_length, out / "best_vs_rounds.png")
    examples_label = "cumulative client examples (all tuning)"
    figures.best_so_far(curve, records, "examples", examples_label, target, None, out / "best_vs_examples.png")
    has_hparams_fig = figures.hparams_per_round(records, out / "hparams_per_round.png")
    figures.cost_to_target(seeds_df, out / "rounds_to_target.png")

    doc = Doc()
    doc.heading(f"FATHOM vs baselines on {title_task}", 1)
    doc.para(
        "Every number and figure below is computed from the Optuna storage by "
        "studies.report.build_report; nothing is carried over from the process that ran "
        "the studies."
    )
    doc.heading("Configuration")
    storage_text = mask_url(storage) if isinstance(storage, str) else type(storage).__name__
    dashboard = dashboard_command(storage if isinstance(storage, str) else "<storage URL>", artifact_dir)
    settings = {r.tuner: ", ".join(f"{k}={v}" for k, v in r.config.items()) for r in records}
    units = {r.tuner: r.unit for r in records}
    cfg = []
    for tuner, g in seeds_df.groupby("tuner", sort=False):
        cfg.append(
            {
                "tuner": tuner,
                "one trial is a": units[tuner],
                "seeds": ", ".join(str(s) for s in g["seed"]),
                "rounds per training run": g["rounds_per_run"].iloc[0],
                "tuning budget (rounds)": g["budget_rounds"].iloc[0],
                "trials (per seed)": ", ".join(str(t) for t in g["trials"]),
                "settings": settings[tuner],
            }
        )
    doc.bullets(
        [
            (
                f"task: {task_name}; target: validation {metric} "
                f"{'>=' if target.mode == 'max' else '<='} {target.value:g}"
            ),
            (
                f"storage: {storage_text} (studies are named {title_task}/<tuner>/seed<k>; "
                f"see them with: {dashboard})"
            ),
            (
                "budget: a tuner that adapts during one run (one trial per round) spends one "
                "training run; a search tuner (one trial per run) gets the tuning budget in "
                "communication rounds, summed over all its trials (pruned ones included)."
            ),
        ]
    )
    doc.table(pd.DataFrame(cfg))
    doc.heading("Results (mean ± sd over seeds)")
    doc.para(
        "Rounds and examples to target: what the whole tuning process spent until any "
        "model first met the target on validation (averaged over the seeds that reached it; "
        "'never reached' counts the others). Test metric: the model each tuner returns "
        "(one-run tuners: the final model; search tuners: the best completed trial on "
        "validation). "
        "Totals: everything the tuner spent; wall time is the whole time each run took "
        "(every process that worked on it, interrupted ones included), with the part spent "
        "compiling JAX programs shown apart: compilation falls on whichever tuner first "
        "needs a program shape (all tuners share one process and its compiled programs)."
    )
    doc.table(shown)
    doc.heading("Figures")
    doc.image(
        "best_vs_rounds.png",
        "Best validation metric vs cumulative communication rounds: "
        "one-run tuners against the search tuners' many trials, on one axis.",
    )
    doc.image("best_vs_examples.png", "The same against cumulative client examples.")
    if has_hparams_fig:
        doc.image(
            "hparams_per_round.png",
            "Learning rate, local epochs, batch size and local steps per round of the "
            "tuners that adapt during one run.",
        )
    doc.image(
        "rounds_to_target.png",
        "Rounds and client examples until the target, with the number of seeds that reached it.",
    )
    if starts:
        _versus_section(doc, storage, task_name, starts, tuners, seeds, out)
    doc.heading("Per seed")
    doc.table(seeds_df)
    doc.heading("Environment (at report time)")
    doc.table(_environment())
    return doc.write(out, f"FATHOM vs baselines on {title_task}")


def _versus_section(doc: Doc, storage, task_name: str, starts, tuners, seeds, out: pathlib.Path) -> None:
    """Each tuner against static FedAvg from the same start, read from every start's studies."""
    frames, records = [], []
    for label in starts:
        mine = load_runs(storage, study_task(task_name, label), tuners=tuners, seeds=seeds)
        records += mine
        if mine:
            frames.append(per_seed(mine).assign(start=label))
    if not records:
        return
    target = records[0].target
    seeds_df = pd.concat(frames, ignore_index=True)
    seeds_df = seeds_df[["start", *seeds_df.columns[:-1]]]
    seeds_df.to_csv(out / "versus_per_seed.csv", index=False)
    table = versus(seeds_df, target)
    table.to_csv(out / "versus.csv", index=False)
    shown = table.iloc[:, :SHOWN].assign(loss=table["loss"].map(lambda w: f"LOSS: {w}" if w else ""))
    (out / "versus.md").write_text(markdown_table(shown) + "\n")
    doc.heading("Versus not tuning: each tuner against static FedAvg from the same start")
    losses = int((table["loss"] != "").sum())
    doc.para(
        f"From each start ({', '.join(starts)}: the task's init_hparams replaced by the start, "
        f"clipped to its bounds), every tuner against static FedAvg ({REFERENCE}) from the same "
        "start and seed. Reached: seeds on which validation met the target; rounds to target: "
        "mean over those seeds. A loss: the tuner's test metric (mean over seeds) is worse "
        "than static FedAvg's by more than 1 point of accuracy (for a metric that is not a "
        "fraction: 1 % of static FedAvg's), or static FedAvg reached the target on a seed where "
        f"the tuner did not. Losses: {losses} of {len(table)} rows."
    )
    doc.table(shown)
    if not table.empty:
        run_length = records[0].rounds_per_run
        figures.versus_static(table, target, run_length, REFERENCE, out / "versus_static.png")
        doc.image(
            "versus_static.png",
            "Rounds to target and test metric per start: static FedAvg is the black bar "
            "across each start, each tuner a dot (a cross at the round cap: never reached), "
            "a red ring marks a loss.",
        )
