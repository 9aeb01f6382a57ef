"""One FATHOM run on a built-in task, recorded in an Optuna storage.

Usage:
    python -m studies.fathom [--task digits] [--rounds N] [--seed K]
                             [--storage sqlite:///reports/fathom_tune.db]
                             [--checkpoint run.npz]

Prints the per-round hyperparameters and metrics, rounds to the task's
target and the final validation and test metrics. The study is named
``<task>/fathom/seed<k>``; open it with
``optuna-dashboard --host 127.0.0.1 <storage>`` (printed at the end).
With ``--checkpoint``, the run checkpoints every round; after a crash the
same command continues it, in the study the checkpoint names. Bad options exit with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import optuna
import pandas as pd

import fathom_tune
from fathom_tune.checkpoint import load_checkpoint
from fathom_tune.storage import mask_url
from studies._cli import SQLITE, dashboard_command, storage_problem

PROG = "python -m studies.fathom"
DEFAULT_STORAGE = "sqlite:///reports/fathom_tune.db"
COLUMNS = [
    "round", "learning_rate", "local_epochs", "batch_size", "local_steps", "H", "G", "train_loss",
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[1])
    parser.add_argument("--task", default="digits", choices=sorted(fathom_tune.tasks.REGISTRY))
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's num_rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage (default {DEFAULT_STORAGE})")
    parser.add_argument("--study-name", default=None, help="default: <task>/fathom/seed<k>, suffixed if taken")
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint file (.npz) to write, or to resume from if it exists"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.study_name is not None and not args.study_name:
        parser.error("--study-name must not be empty")
    why = storage_problem(args.storage)
    if why:
        parser.error(f"--storage {why}")
    args.resume_study = None
    if args.checkpoint is not None:
        path = pathlib.Path(args.checkpoint)
        if path.is_dir() or not path.parent.is_dir():
            parser.error(f"--checkpoint {args.checkpoint!r}: give a file path in an existing directory")
        if path.exists():
            try:
                meta, _ = load_checkpoint(path, kind="fathom", templates={})
            except fathom_tune.CheckpointError as exc:
                parser.error(f"--checkpoint: {exc}")
            args.resume_study = (meta.get("fingerprint") or {}).get("study")
    return args


def free_study_name(storage, base: str) -> str:
    """``base``, or ``base#2``, ``base#3``... if a study of that name already holds rounds."""
    taken = {s.study_name for s in optuna.get_all_study_summaries(storage) if s.n_trials}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}#{k}"
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    created = []  # directories made for an SQLite file, removed again if it cannot be opened
    if args.storage.startswith(SQLITE):  # its directory was checked by parse_args
        parent = pathlib.Path(args.storage[len(SQLITE) :]).parent
        created = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = fathom_tune.open_storage(args.storage, argument="--storage")
    except (TypeError, ValueError) as exc:
        for d in created:
            if not any(d.iterdir()):
                d.rmdir()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = fathom_tune.tasks.get(args.task)
    name = args.study_name or args.resume_study
    try:
        if name is None:
            name = free_study_name(storage, fathom_tune.study_name(task.name, "fathom", args.seed))
        result = fathom_tune.optimize(
            task,
            seed=args.seed,
            num_rounds=args.rounds,
            storage=storage,
            study_name=name,
            checkpoint=args.checkpoint,
            progress=True,
        )
    except fathom_tune.CheckpointError as exc:
        print(f"{PROG}: error: --checkpoint: {exc}", file=sys.stderr)
        return 2
    metric = f"val_{task.target.metric}"
    with pd.option_context("display.max_rows", None, "display.width", 160, "display.float_format", "{:.4g}".format):
        print(result.history[COLUMNS + [metric, "examples", "seconds"]].to_string(index=False))
    reached = result.rounds_to_target
    print(f"\ntask {task.name}: target validation {task.target.metric} "
          f"{'>=' if task.target.mode == 'max' else '<='} {task.target.value}")
    print(f"rounds to target: {reached if reached is not None else 'not reached'}")
    print(f"final validation: {result.validation_metrics}")
    print(f"final test:       {result.test_metrics}")
    print(f"next hyperparameters: {result.hparams}")
    print(f"cost: {result.cost}")
    print(f"study {name!r} in {mask_url(args.storage)}; dashboard: {dashboard_command(args.storage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
