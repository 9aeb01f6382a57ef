"""The report's seaborn figures, drawn from the run records of a comparison.

Every function takes the tables of :mod:`studies.report` (built from
:class:`fathom_tune.record.RunRecord`) and writes one PNG; none asks which
tuner wrote a run.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from fathom_tune.hparams import NAMES  # noqa: E402
from fathom_tune.record import RunRecord  # noqa: E402
from fathom_tune.task import Target  # noqa: E402

__all__ = ["best_so_far", "cost_to_target", "hparams_per_round", "versus_figure", "versus_static"]

_DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1))]
_PLAIN = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")


def _on_grid(curve: pd.DataFrame, records: list[RunRecord], x: str, points: int = 400) -> pd.DataFrame:
    """Each run's best-so-far step function on a shared grid, for the median over
    seeds: NaN before its first evaluation; after its last evaluation it holds its
    best until the most that any seed of the same tuner spent (a finished tuner keeps
    its best model), then NaN."""
    spent: dict[str, float] = {}
    for r in records:  # a tuner's curve runs to the most any of its seeds spent
        total = float(getattr(r.ledger, x))
        spent[r.tuner] = max(spent.get(r.tuner, 0.0), total)
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


def best_so_far(curve, records, x: str, xlabel: str, target: Target, run_length, path) -> None:
    """Best validation metric against cumulative ``x`` (rounds or examples), per tuner:
    one thin line per seed and a thick line for the median over seeds (a band of mean
    +/- sd over two or three seeds means little, so every seed is shown as it is)."""
    data = _on_grid(curve, records, x)
    tuners = list(dict.fromkeys(data["tuner"]))
    colors = sns.color_palette(n_colors=len(tuners))
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, tuner in enumerate(tuners):  # later tuners dashed, so coinciding curves stay visible
        mine = data[data["tuner"] == tuner]
        style = {"color": colors[i], "ls": _DASHES[i % len(_DASHES)], "where": "post"}
        for _, seed in mine.groupby("seed", sort=False):
            ax.step(seed[x], seed["best"], lw=0.9, alpha=0.45, **style)
        median = mine.groupby(x, sort=True)["best"].median()
        seeds = mine["seed"].nunique()
        label = f"{tuner} (median of {seeds} seeds)" if seeds > 1 else tuner
        ax.step(median.index, median.to_numpy(), lw=2.4 - 0.3 * min(i, 4), label=label, **style)
    ax.axhline(target.value, color="black", ls="--", lw=1, label=f"target {target.metric} {target.value:g}")
    if run_length:
        ax.axvline(run_length, color="grey", ls=":", lw=1, label="one training run")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"best validation {target.metric} so far")
    ax.set_title(f"Best validation {target.metric} vs {xlabel}\n(thin: each seed; thick: median over seeds)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hparams_per_round(records: list[RunRecord], path) -> bool:
    """The hyperparameters per round of every run whose trials are rounds; False if none."""
    frames = []
    for r in records:
        if r.unit != "round" or r.steps.empty:
            continue
        steps = r.steps[r.steps["rounds"] > 0]
        frames.append(
            pd.DataFrame(
                {
                    "round": steps["round"] if "round" in steps else steps["number"],
                    "run": f"{r.tuner} seed {r.seed}",
                    **{n: steps[n] for n in NAMES},
                    "local_steps": steps["local_steps"] if "local_steps" in steps else np.nan,
                }
            )
        )
    if not frames:
        return False
    df = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    labels = {
        "learning_rate": "learning rate",
        "local_epochs": "local epochs",
        "batch_size": "batch size",
        "local_steps": "local steps (sum over the round's clients)",
    }
    for ax, (col, label) in zip(axes.flat, labels.items()):
        sns.lineplot(data=df, x="round", y=col, hue="run", ax=ax, legend=col == "learning_rate")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PLAIN)
        ax.yaxis.set_minor_formatter(_PLAIN)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Hyperparameters per communication round (tuners that adapt during one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cost_to_target(seeds: pd.DataFrame, path) -> None:
    """Rounds and client examples until the target, per tuner, with how many seeds reached it."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    order = list(dict.fromkeys(seeds["tuner"]))
    for ax, (col, label) in zip(
        axes, [("rounds_to_target", "communication rounds"), ("examples_to_target", "client examples")]
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
    fig.suptitle("Cost until a model first reaches the target (mean ± sd over the seeds that reached it)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versus_figure(table: pd.DataFrame, target: Target, run_length: int | None, reference: str):
    """Each tuner against static FedAvg from the same start (:func:`studies.starts.versus`):
    rounds to target (left) and the returned model's test metric (right), one group per
    start; static FedAvg is the black bar across each group, a tuner's dot is its mean over
    the seeds (rounds: over those that reached the target; a cross at the round cap: none
    did), a red ring marks a loss. Returns the figure, laid out (the legend right of the axes)."""
    starts = list(dict.fromkeys(table["start"]))
    tuners = list(dict.fromkeys(table["tuner"]))
    colors = dict(zip(tuners, sns.color_palette(n_colors=len(tuners))))
    width = 0.8 / max(len(tuners), 1)
    cap = float(run_length) if run_length else float(np.nanmax([*table["rounds_to_target_mean"], 1.0]))
    metric = f"test {target.metric}"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (mine, ref, loss, ylabel) in zip(axes, [
        ("rounds_to_target_mean", "static_rounds_to_target_mean", "loss_target", "rounds to target (mean over seeds reached)"),
        (metric, f"static {metric}", "loss_test", f"{metric} of the returned model (mean over seeds)"),
    ]):
        never = mine.startswith("rounds")
        for g, start in enumerate(starts):
            rows = table[table["start"] == start]
            ref_value = rows[ref].iloc[0]
            if never and not math.isfinite(ref_value):
                ax.hlines(cap, g - 0.45, g + 0.45, color="black", lw=2.5, ls=(0, (2, 1)))
            else:
                ax.hlines(ref_value, g - 0.45, g + 0.45, color="black", lw=2.5)
            for i, tuner in enumerate(tuners):
                row = rows[rows["tuner"] == tuner]
                if row.empty:
                    continue
                row, x = row.iloc[0], g - 0.4 + width * (i + 0.5)
                y = row[mine]
                if never and not math.isfinite(y):
                    ax.plot(x, cap, marker="x", ms=8, mew=2, color=colors[tuner], ls="none")
                    y = cap
                else:
                    ax.plot(x, y, marker="o", ms=7, color=colors[tuner], ls="none")
                if row[loss]:
                    ax.plot(x, y, marker="o", ms=15, mfc="none", mec="red", mew=2, ls="none")
        if never:
            ax.set_ylim(0, cap * 1.1)
        ax.set_xticks(range(len(starts)), starts)
        ax.set_xlim(-0.5, len(starts) - 0.5)
        ax.set_xlabel("start")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("Rounds until validation meets the target")
    axes[1].set_title(f"Test {target.metric} of the returned model")
    handles = [
        matplotlib.lines.Line2D([], [], color="black", lw=2.5, label=f"static FedAvg ({reference})"),
        *(matplotlib.lines.Line2D([], [], color=colors[t], marker="o", ls="none", label=t) for t in tuners),
        matplotlib.lines.Line2D([], [], color="black", lw=2.5, ls=(0, (2, 1)), label="static FedAvg never\nreached (at the cap)"),
        matplotlib.lines.Line2D([], [], color="grey", marker="x", mew=2, ls="none", label="never reached\n(at the round cap)"),
        matplotlib.lines.Line2D([], [], marker="o", ms=12, mfc="none", mec="red", mew=2, ls="none",
                                label="loss vs static FedAvg"),
    ]
    legend = fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(f"Each tuner against static FedAvg from the same start (target: validation "
                 f"{target.metric} {'>=' if target.mode == 'max' else '<='} {target.value:g})")
    fig.canvas.draw()
    right = 1 - (legend.get_window_extent().width + 12) / fig.bbox.width
    fig.tight_layout(rect=(0, 0, right, 1))
    return fig


def versus_static(table: pd.DataFrame, target: Target, run_length: int | None, reference: str, path) -> None:
    """:func:`versus_figure` saved as a PNG."""
    fig = versus_figure(table, target, run_length, reference)
    fig.savefig(path, dpi=110)
    plt.close(fig)
