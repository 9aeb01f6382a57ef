"""One FATHOM run on a built-in task, recorded in an Optuna storage.

Usage:
    python -m studies.fathom [--task digits] [--rounds N] [--seed K]
                             [--storage sqlite:///reports/fathom_tune.db]
                             [--checkpoint run.npz] [--study-name NAME]

Prints each round as it finishes (hyperparameters, local steps, H, G, training
loss, validation metrics), then the rounds to the task's target and the final
validation and test metrics. The study is named ``<task>/fathom/seed<k>``;
open it with ``optuna-dashboard --host 127.0.0.1 <storage>`` (printed at the
end). The run checkpoints every round (default: ``<storage file>-checkpoints/``
next to the storage file), so the same command continues a run cut off by Ctrl-C, SIGTERM
or a crash, and prints a finished one again without training. Bad options
exit with status 2 before anything is written; an interrupt with status 130.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from studies._cli import SQLITE, TASKS, URL, dashboard_command, interruptible, storage_problem

PROG = "python -m studies.fathom"
DEFAULT_STORAGE = "sqlite:///reports/fathom_tune.db"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=TASKS)
    parser.add_argument("--rounds", type=int, default=None, help="default: the task's num_rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage (default {DEFAULT_STORAGE})")
    parser.add_argument("--study-name", default=None, help="default: <task>/fathom/seed<k>")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file (.npz) to write, or to continue from if it exists "
        "(default: <storage file>-checkpoints/<task>-fathom-seed<k>.npz next to the storage file)",
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
    import fathom_tune
    from fathom_tune.storage.checkpoint import load_checkpoint

    given = args.checkpoint is not None
    if not given:  # its directory is made when the run starts
        args.checkpoint = _default_checkpoint(args.storage, args.task, args.seed)
    path = pathlib.Path(args.checkpoint)
    if path.is_dir() or (given and not path.parent.is_dir()):
        parser.error(f"--checkpoint {args.checkpoint!r}: give a file path in an existing directory")
    args.resume_study = None
    if path.exists():
        try:
            meta, _ = load_checkpoint(path, kind="fathom", templates={})
        except fathom_tune.CheckpointError as exc:
            parser.error(f"--checkpoint: {exc}")
        args.resume_study = (meta.get("fingerprint") or {}).get("study")
    return args


def _default_checkpoint(storage: str, task: str, seed: int) -> str:
    """``<storage file>-checkpoints/<task>-fathom-seed<k>.npz`` beside an SQLite or journal
    file (one folder per storage, apart from ``studies.compare``'s), else under ``reports/``."""
    if storage.startswith(SQLITE):
        db = pathlib.Path(storage[len(SQLITE) :])
    elif URL.match(storage):
        db = pathlib.Path("reports") / "fathom"
    else:
        db = pathlib.Path(storage)
    return str(db.with_name(db.stem + "-checkpoints") / f"{task}-fathom-seed{seed}.npz")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        with interruptible():
            return _run(args)
    except KeyboardInterrupt:
        from fathom_tune.storage import mask_url

        print(
            f"\n{PROG}: interrupted; every finished round is in the storage and the checkpoint "
            f"{mask_url(args.checkpoint)}: run the same command again to continue",
            file=sys.stderr,
        )
        return 130


def _run(args) -> int:
    import optuna

    import fathom_tune

    pathlib.Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
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
    rounds = logging.getLogger("fathom_tune.rounds")
    shown, level = logging.StreamHandler(sys.stdout), rounds.level
    rounds.setLevel(logging.INFO)
    rounds.addHandler(shown)
    try:
        return _optimize(args, storage)
    finally:  # a caller's logging is as it was (main may run in-process, more than once)
        rounds.removeHandler(shown)
        rounds.setLevel(level)


def _optimize(args, storage) -> int:
    import fathom_tune
    from fathom_tune.fathom.optimize import ROUND_HEADER
    from fathom_tune.storage import mask_url

    task = fathom_tune.tasks.get(args.task)
    name = args.study_name or args.resume_study or fathom_tune.study_name(task.name, "fathom", args.seed)
    print(f"FATHOM on {task.name}, study {name!r}", flush=True)
    print(ROUND_HEADER, flush=True)
    try:
        result = fathom_tune.optimize(
            task,
            seed=args.seed,
            num_rounds=args.rounds,
            storage=storage,
            study_name=name,
            checkpoint=args.checkpoint,
        )
    except (fathom_tune.CheckpointError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    reached = result.rounds_to_target
    print(f"\ntask {task.name}: target validation {task.target.metric} "
          f"{'>=' if task.target.mode == 'max' else '<='} {task.target.value}")
    print(f"rounds to target: {reached if reached is not None else 'not reached'}")
    print(f"final validation: {result.validation_metrics}")
    print(f"final test:       {result.test_metrics}")
    print(f"next hyperparameters: {result.hparams}")
    print(f"cost: {result.cost}")
    print(f"study {name!r} in {mask_url(args.storage)}; checkpoint {mask_url(args.checkpoint)}")
    print(f"dashboard: {dashboard_command(args.storage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
