"""FATHOM against the other tuners on one task, several seeds, one storage, one report.

Usage:
    python -m studies.compare --quick
    python -m studies.compare [--task digits] [--tuners fathom fedex fedhyper random tpe tpe+hyperband]
                              [--seeds 0 1 2] [--budget-multiple 10 | --budget-rounds N]
                              [--rounds N] [--storage URL] [--out reports]
                              [--starts default eta/10 eta*10 B=4 B=256]

Every registered tuner (:mod:`fathom_tune.tuners`: FATHOM, "Federated
Hypergradient Descent", A. K. Kan, arXiv 2211.02106; the search baselines;
the one-run peers FedEx, FedHyper and fathom+server of :mod:`fathom_tune.peers`;
any tuner a package registers) runs through the one tuner interface with the
same tuning budget per seed, in communication rounds summed over all it
trains (default: ``--budget-multiple`` x one run of ``--rounds`` rounds); a
tuner that adapts during one run, such as FATHOM or its peers, spends one run of it. Every study lands in one Optuna storage, named
``<task>/<tuner>/seed<k>`` (default storage: ``sqlite:///<out>/compare.db``),
and the report ``<out>/<task>/report.md`` (+ ``report.html``, CSV and
markdown tables, PNG figures) is built from that storage alone
(:func:`studies.report.build_report`). Each run also gets a companion study
``<task>/<tuner>/seed<k>/val_<metric> (trial n: <g>n rounds)``: its validation
metric against cumulative communication rounds, one grid for every tuner, so
the dashboard's compare page shows the runs like with like; the report's
summary and figures are attached to every study (dashboard note, artifacts
in ``<out>/artifacts``; :mod:`studies.dashboard`). See every study with
``optuna-dashboard --host 127.0.0.1 --artifact-dir <out>/artifacts <storage URL>``
(the command is printed at the end, the password of the URL masked).

Resuming: re-running the same command continues where it stopped. Runs
checkpoint into ``<out>/checkpoints/``. A search study continues its tuning
budget (finished trials are not run again; a trial cut off mid-run continues
from its checkpoint; a study whose budget is spent runs nothing). A FATHOM
study (or a peer's) that holds its whole run is read back; one that holds part of a run
continues from its checkpoint and ends as an uninterrupted run would (one
without a checkpoint is run again).

``--starts``: every tuner runs from each start named (:mod:`studies.starts`:
the task's ``init_hparams`` replaced by the start, clipped to the task's
bounds), and so does static FedAvg, the reference ("not tuning"), recorded
in the same storage as the study ``<task>/fedavg/seed<k>``; a start other
than ``default`` names its studies' task ``<task>@<start>`` (``eta/10`` is
``@eta*0.1``): ``digits@eta*10/fathom/seed0``. The report gains a table and a
figure of each tuner against static FedAvg from the same start, every loss
flagged. Without ``--starts`` nothing of this runs.

``--quick``: digits, tuners ``fathom fathom-auto fathom+server fedex fedhyper random tpe tpe+hyperband``, seeds 0 and 1,
training runs of 50 rounds, baseline budget 6 runs (300 rounds): a few
minutes on two CPU cores, compilation included.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import sys
import time

from studies._cli import (
    SQLITE,
    STARTS,
    dashboard_command,
    interruptible,
    storage_problem,
    unwritable_reason,
)

# fathom_tune (and with it JAX), optuna and the report are imported once the
# options have parsed: `--help` answers at once.

QUICK = {
    "task": "digits",
    "tuners": ["fathom", "fathom-auto", "fathom+server", "fedex", "fedhyper", "random", "tpe", "tpe+hyperband"],
    "seeds": [0, 1],
    "rounds": 50,
    "budget_multiple": 6.0,
}
DEFAULT_TUNERS = ["fathom", "fathom-auto", "fathom+server", "fedex", "fedhyper", "random", "tpe", "tpe+hyperband"]
DEFAULT_SEEDS = [0, 1, 2]
DEFAULT_MULTIPLE = 10.0


def valid_tuners() -> list[str]:
    """Every registered tuner (:func:`fathom_tune.tuners.names`)."""
    from fathom_tune import tuners

    return tuners.names()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m studies.compare",
        description="FATHOM vs the baselines: Optuna studies, pandas tables, seaborn report.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick configuration (digits, 2 seeds, 50-round runs, 6-run budget); "
        "explicit options override it",
    )
    p.add_argument(
        "--task",
        default=None,
        help="a built-in offline task (default digits; an unknown name is answered with the list)",
    )
    p.add_argument(
        "--tuners",
        nargs="+",
        default=None,
        help=f"registered tuners (default: {' '.join(DEFAULT_TUNERS)}; an unknown name is answered "
        "with the list of every registered tuner)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help=f"seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of one training run: FATHOM's run and each baseline trial "
        "(default: the task's num_rounds)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-multiple",
        type=float,
        default=None,
        help=f"baseline tuning budget in training runs (default {DEFAULT_MULTIPLE:g})",
    )
    budget.add_argument(
        "--budget-rounds",
        type=int,
        default=None,
        help="baseline tuning budget in communication rounds, summed over all trials",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL or journal file (default: sqlite:///<out>/compare.db)",
    )
    p.add_argument(
        "--out",
        default="reports",
        help="output directory (default: reports); the report goes to <out>/<task>/",
    )
    p.add_argument(
        "--starts",
        nargs="+",
        default=None,
        metavar="START",
        help=f"run every tuner and static FedAvg from each of these starts ({' '.join(STARTS)}) "
        "and report each tuner against static FedAvg from the same start (default: none, the "
        "task's own start only)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and validates every option; exits with status 2 (nothing written) on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.task = args.task or quick.get("task", "digits")
    args.tuners = args.tuners or quick.get("tuners", DEFAULT_TUNERS)
    args.seeds = args.seeds if args.seeds is not None else quick.get("seeds", DEFAULT_SEEDS)
    if args.rounds is None:
        args.rounds = quick.get("rounds")
    if args.budget_multiple is None and args.budget_rounds is None:
        args.budget_multiple = quick.get("budget_multiple", DEFAULT_MULTIPLE)
    if args.starts is not None:
        unknown = [s for s in args.starts if s not in STARTS]
        if unknown:
            parser.error(
                f"--starts: unknown start(s) {', '.join(map(repr, unknown))}; valid starts: {', '.join(STARTS)}"
            )
        if len(set(args.starts)) != len(args.starts):
            parser.error(f"--starts lists a start twice: {args.starts}")

    import fathom_tune
    from fathom_tune import tuners
    from studies.starts import REFERENCE, start_task

    if args.starts is not None:  # static FedAvg is every start's reference: named or not, it runs
        args.tuners = [t for t in args.tuners if t != REFERENCE]
    if args.task not in fathom_tune.tasks.REGISTRY:
        parser.error(
            f"--task: unknown task {args.task!r}; valid tasks: {', '.join(sorted(fathom_tune.tasks.REGISTRY))}"
        )
    unknown = [t for t in args.tuners if t not in valid_tuners()]
    if unknown:
        parser.error(
            f"--tuners: unknown tuner(s) {', '.join(map(repr, unknown))}; valid tuners: {', '.join(valid_tuners())}"
        )
    if len(set(args.tuners)) != len(args.tuners):
        parser.error(f"--tuners lists a tuner twice: {args.tuners}")
    for t in args.tuners:
        check = getattr(tuners.get(t), "check_available", None)
        try:
            if check is not None:
                check()
        except ImportError as exc:
            parser.error(f"--tuners: tuner {t!r}: {exc}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct ints >= 0, got {args.seeds}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.budget_multiple is not None and not (
        math.isfinite(args.budget_multiple) and args.budget_multiple > 0
    ):
        parser.error(f"--budget-multiple must be a positive number, got {args.budget_multiple}")

    task = fathom_tune.tasks.get(args.task)
    if args.rounds is not None:
        task = task.replace(num_rounds=args.rounds, eval_every=min(task.eval_every, args.rounds))
    args.task_obj = task
    args.runs = [(None, task)] if args.starts is None else [(s, start_task(task, s)) for s in args.starts]
    if args.budget_rounds is None:
        args.budget_rounds = round(args.budget_multiple * task.num_rounds)
    if args.budget_rounds < task.num_rounds:
        parser.error(
            f"--budget-rounds/--budget-multiple: budget of {args.budget_rounds} rounds "
            "is smaller than one training run "
            f"({task.num_rounds} rounds of task {args.task!r}); use --budget-rounds >= {task.num_rounds} "
            "or --budget-multiple >= 1"
        )

    out = pathlib.Path(args.out)
    report_dir = out / task.name
    for path in (out, report_dir):
        if path.exists() and not path.is_dir():
            parser.error(f"--out: output path {str(path)!r} is a file, not a directory")
    why = unwritable_reason(report_dir)
    if why:
        parser.error(f"cannot write the report under --out {str(out)!r}: {why}")
    args.report_dir = report_dir
    if args.storage is None:
        args.storage = f"{SQLITE}{out / 'compare.db'}"
    else:
        why = storage_problem(args.storage)
        if why:
            parser.error(f"--storage {why}")
    return args


def _check_existing(storage, args) -> str | None:
    """Why the storage's existing studies conflict with this comparison, or None."""
    import optuna

    from fathom_tune import record

    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    for _, task, tuner in _plan(args):
        for seed in args.seeds:
            name = record.study_name(task.name, tuner, seed)
            if name not in names or not names[name].n_trials:
                continue
            have = names[name].user_attrs.get(record.ROUNDS_PER_RUN)
            if have is not None and have != task.num_rounds:
                return (
                    f"study {name!r} in this storage holds runs of {have} rounds, this comparison "
                    f"asks for {task.num_rounds}; use another --storage (or --out) or the same --rounds"
                )
    return None


def _plan(args) -> list[tuple]:
    """``(start label or None, task, tuner)`` of every run of one seed, in order: per start,
    static FedAvg first (with ``--starts``), then the tuners."""
    from studies.starts import REFERENCE

    return [
        (label, task, tuner)
        for label, task in args.runs
        for tuner in ([] if label is None else [REFERENCE]) + list(args.tuners)
    ]


def _tuner(name: str):
    """The registered tuner ``name``, or the reference, static FedAvg."""
    from fathom_tune import tuners
    from studies.starts import REFERENCE, StaticFedAvg

    return {REFERENCE: StaticFedAvg}.get(name, lambda: tuners.get(name))()


def _run_tuner(name: str, storage, task, seed: int, budget: int, progress: bool, out_root) -> str:
    """Runs (or continues) one tuner on one seed; returns a line for the log."""
    import optuna

    from fathom_tune import record

    study = record.study_name(task.name, name, seed)
    before = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}.get(study, 0)
    checkpoints = out_root / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    result = _tuner(name).run(
        task, budget_rounds=budget, seed=seed, storage=storage, checkpoint_dir=checkpoints, progress=progress
    )
    trials = len(result.study.trials)
    return f"{study}: {trials - before} new trials, {trials} in all, {result.cost.rounds} rounds spent"


def main(argv=None) -> int:
    """Runs the comparison and writes the report; returns the exit status.

    Ctrl-C or SIGTERM ends it with one line and exit status 130; every finished
    round and trial is in the storage and the same command continues from there.
    A second comparison writing to the same ``--out`` at the same time is refused.
    """
    args = parse_args(argv)
    from fathom_tune.storage.checkpoint import exclusive

    out_root = pathlib.Path(args.out)
    out_created = not out_root.exists()
    out_root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(out_root / "compare", what="--out"):
            return _compare(args, out_root, out_created)
    except ValueError as exc:  # the lock is held: another comparison writes here
        print(f"python -m studies.compare: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\npython -m studies.compare: interrupted; every finished round and trial is saved "
            "in the storage: run the same command again to continue",
            file=sys.stderr,
        )
        return 130


def _compare(args, out_root: pathlib.Path, out_created: bool) -> int:
    import optuna

    import fathom_tune
    from fathom_tune.storage import mask_url
    from studies.dashboard import publish
    from studies.report import build_report

    if args.storage.startswith(SQLITE):  # validated writable in parse_args
        pathlib.Path(args.storage[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = fathom_tune.open_storage(args.storage, argument="--storage", heartbeat=(10, 30))
        conflict = _check_existing(storage, args)
    except (TypeError, ValueError) as exc:
        conflict = str(exc)
    if conflict:
        if out_created and not any(p.name != "compare.lock" for p in out_root.iterdir()):
            out_root.rmdir()
        print(f"python -m studies.compare: error: {conflict}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(format="%(message)s")
    for name in ("fathom_tune", "baselines"):  # what the tuners say: resumed, read back, ...
        logging.getLogger(name).setLevel(logging.INFO)
    # ... but not FATHOM's line per round (python -m studies.fathom shows those, with a header)
    logging.getLogger("fathom_tune.rounds").setLevel(logging.WARNING)
    task = args.task_obj
    start = time.perf_counter()
    starts = "" if args.starts is None else f" and static FedAvg from the starts {', '.join(args.starts)}"
    print(
        f"comparing {', '.join(args.tuners)}{starts} on {task.name}, seeds {args.seeds}: runs of "
        f"{task.num_rounds} rounds, a budget of {args.budget_rounds} rounds each; storage "
        f"{mask_url(args.storage)}",
        flush=True,
    )
    with interruptible():
        for seed in args.seeds:
            for _, run_task, tuner in _plan(args):
                line = _run_tuner(tuner, storage, run_task, seed, args.budget_rounds, not args.no_progress, out_root)
                print(line, flush=True)
    artifacts = out_root / "artifacts"
    kept = list(dict.fromkeys(t for _, _, t in _plan(args)))
    report = build_report(
        args.storage, task.name, args.report_dir, tuners=kept, seeds=args.seeds, artifact_dir=artifacts,
        starts=args.starts,
    )
    with interruptible():
        for _, run_task in args.runs:
            publish(storage, run_task.name, args.report_dir, artifacts, tuners=kept, seeds=args.seeds)
    print(
        f"report: {report} ({time.perf_counter() - start:.0f} s); "
        f"dashboard: {dashboard_command(args.storage, artifacts)}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
