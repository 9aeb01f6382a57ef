"""One-run tuners from five starts: ``python -m studies.compare --starts ...``, by its old name.

Usage:
    python -m studies.peers [--tasks digits] [--seeds 0 1 2] [--rounds N]
                            [--starts default eta/10 eta*10 B=4 B=256]
                            [--tuners fathom fathom+server fedex fedhyper-gm fedhyper-full fedavg]
                            [--out reports/peers]

runs, for each task of ``--tasks``, ::

    python -m studies.compare --task <task> --starts <starts> --tuners <tuners>
                              --seeds <seeds> [--rounds N] --out <out> --no-progress

(one storage, ``<out>/compare.db``; one report per task, ``<out>/<task>/report.md``,
with its "versus not tuning" table ``versus.md``). ``fedavg``, static FedAvg from
each start, is the comparison's reference and runs whether named or not. Every
task's options are checked before anything runs: bad ones exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from studies._cli import STARTS, TASKS

PROG = "python -m studies.peers"
TUNERS = ("fathom", "fathom+server", "fedex", "fedhyper-gm", "fedhyper-full", "fedavg")


def compare_argv(argv=None) -> list[list[str]]:
    """The ``studies.compare`` command line of each task; exits with status 2 on bad input."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits"], choices=TASKS)
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--starts", nargs="+", default=list(STARTS))
    parser.add_argument("--tuners", nargs="+", default=list(TUNERS))
    parser.add_argument("--rounds", default=None, help="rounds per run (default: the task's)")
    parser.add_argument("--out", default="reports/peers")
    args = parser.parse_args(argv)
    if len(set(args.tasks)) != len(args.tasks):
        parser.error(f"--tasks lists a task twice: {args.tasks}")
    rounds = [] if args.rounds is None else ["--rounds", args.rounds]
    return [
        ["--task", task, "--starts", *args.starts, "--tuners", *args.tuners, "--seeds", *args.seeds,
         *rounds, "--out", args.out, "--no-progress"]
        for task in args.tasks
    ]


def main(argv=None) -> int:
    from studies import compare

    runs = compare_argv(argv)
    for run in runs:  # every task's options, before anything runs
        compare.parse_args(run)
    for run in runs:
        status = compare.main(run)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
