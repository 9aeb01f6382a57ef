"""One-run tuners from five starts: FATHOM, its peers and static FedAvg, rounds to target.

For each task, starting point (the task's default, a low learning rate
eta/10, a high one eta x 10, B = 4, B = 256) and seed, one run of every tuner
from that start (the task's ``init_hparams`` replaced by it; FedEx centres
its grid of arms on it) on the same engine, seed and round cap. The table
gives the rounds and client examples until validation first meets the task's
target (mean +/- sd over the seeds that reached it, and how many did), the
test metric of the model returned, and wall time.

Usage:
    python -m studies.peers [--tasks digits] [--seeds 0 1 2] [--rounds N]
                            [--tuners fathom fathom+server fedex fedhyper-gm fedhyper-full fedavg]
                            [--out reports/peers]

``fedavg`` is static FedAvg with the start's hyperparameters; every other
name is a registered tuner. Bad options exit with status 2 before anything
is written or trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import TYPE_CHECKING

from studies._cli import TASKS, unwritable_reason

if TYPE_CHECKING:
    import pandas as pd

PROG = "python -m studies.peers"
STARTS = ("default", "eta/10", "eta*10", "B=4", "B=256")
TUNERS = ("fathom", "fathom+server", "fedex", "fedhyper-gm", "fedhyper-full", "fedavg")


def starts(task) -> dict:
    """The five starting points, relative to the task's default."""
    d = task.init_hparams
    values = (
        d,
        dataclasses.replace(d, learning_rate=d.learning_rate / 10),
        dataclasses.replace(d, learning_rate=d.learning_rate * 10),
        dataclasses.replace(d, batch_size=4.0),
        dataclasses.replace(d, batch_size=256.0),
    )
    return {label: task.bounds.clip(v) for label, v in zip(STARTS, values)}


def run_one(task, tuner: str, seed: int) -> dict:
    """One run of ``tuner`` (a registered name, or ``fedavg``) from ``task.init_hparams``."""
    import fathom_tune

    began = time.perf_counter()
    if tuner == "fedavg":
        out = fathom_tune.fedavg(task, seed=seed)
    else:
        out = fathom_tune.tuners.get(tuner).run(task, seed=seed)
    return {
        "rounds_to_target": out.rounds_to_target,
        "examples_to_target": out.examples_to_target,
        "test": out.test_metrics[task.target.metric],
        "examples": out.cost.examples,
        "seconds": time.perf_counter() - began,
    }


def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, start, tuner): to target over the seeds that reached it, test metric, time."""
    import pandas as pd

    def spread(values, fmt):
        values = values.dropna()
        if values.empty:
            return "never"
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{fmt(values.mean())} ± {fmt(sd)}"

    rows = []
    for (task, start, tuner), g in raw.groupby(["task", "start", "tuner"], sort=False):
        reached = g["rounds_to_target"].notna().sum()
        rows.append({
            "task": task,
            "start": start,
            "tuner": tuner,
            "reached": f"{reached}/{len(g)}",
            "rounds to target": spread(g["rounds_to_target"], lambda v: f"{v:.1f}"),
            "examples to target": spread(g["examples_to_target"], lambda v: f"{v:,.0f}"),
            "test metric": f"{g['test'].mean():.4f} ± {g['test'].std(ddof=1) if len(g) > 1 else 0.0:.4f}",
            "seconds": f"{g['seconds'].mean():.1f}",
        })
    return pd.DataFrame(rows)


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and validates every option; exits with status 2 (nothing written) on bad input."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits"], choices=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--tuners", nargs="+", default=list(TUNERS))
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the task's)")
    parser.add_argument("--out", default="reports/peers")
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct ints >= 0, got {args.seeds}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} is a file; give a directory")
    why = unwritable_reason(out)
    if why:
        parser.error(f"--out {str(out)!r}: {why}")
    import fathom_tune

    valid = ["fedavg", *fathom_tune.tuners.names()]
    unknown = [t for t in args.tuners if t not in valid]
    if unknown:
        parser.error(f"--tuners: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import optuna
    import pandas as pd

    import fathom_tune
    from studies.markdown import markdown_table

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for name in args.tasks:
        base = fathom_tune.tasks.get(name)
        if args.rounds is not None:
            base = base.replace(num_rounds=args.rounds, eval_every=min(base.eval_every, args.rounds))
        for label, start in starts(base).items():
            if label not in args.starts:
                continue
            task = base.replace(init_hparams=start)
            for seed in args.seeds:
                for tuner in args.tuners:
                    r = run_one(task, tuner, seed)
                    rows.append({"task": name, "start": label, "tuner": tuner, "seed": seed, **r})
                    print(rows[-1], flush=True)
                    pd.DataFrame(rows).to_csv(out / "raw.csv", index=False)
    table = summarize(pd.DataFrame(rows))
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown_table(table) + "\n")
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
