"""FATHOM's whole overhead over plain FedAvg, per round, on each kind of storage.

Run: python -m pytest tests/benchmarks/test_fathom_overhead.py -o addopts="" -s
(FATHOM_BENCH_ROUNDS=10000 for the long curve; default 1000.)

Both runs use the same engine and the same hyperparameters every round:
FATHOM's hyper learning rates are 0, so it keeps the task's initial values,
and plain FedAvg runs them with no client statistic. FATHOM's cost per round
is everything it adds: the statistic phi in the local steps, H and m, the
round's trial, its writes to the storage and, where given, the checkpoint.

Per-round time is measured between the ends of consecutive rounds
(``Engine.run_round`` wrapped to note the time), so it holds all the
bookkeeping between two rounds; the runs' fixed costs (opening a storage,
compiling, the final test evaluation) are reported apart as whole-run time.
The cases run interleaved, ``REPEATS`` times, in one process; the table
printed at the end gives each case's median time per round over rounds
100-200 and over the last 100 rounds, and its ratio to FedAvg's.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import optuna
import pytest

import fathom_tune
from fathom_tune import FathomConfig
from fathom_tune.engine import Engine
from fathom_tune.fathom import LocalAgreement
from fathom_tune.loop import Static, run

ROUNDS = int(os.environ.get("FATHOM_BENCH_ROUNDS", "1000"))
REPEATS = int(os.environ.get("FATHOM_BENCH_REPEATS", "3"))
FROZEN = FathomConfig(gamma_local_epochs=0.0, gamma_learning_rate=0.0, gamma_batch_size=0.0)
CASES = ("fedavg", "fedavg+phi", "memory", "journal", "sqlite", "sqlite+checkpoint")
"""``fedavg+phi``: FedAvg on the engine with FATHOM's client statistic on and nothing
else, the part of FATHOM's cost that is in the compiled local steps."""
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _one(case: str, task, folder: str, k: int, rounds: int = ROUNDS) -> None:
    eval_every = rounds  # evaluation once, at the end, in every case
    if case == "fedavg":
        run(Engine(task), Static(task.init_hparams), num_rounds=rounds, eval_every=eval_every)
        return
    if case == "fedavg+phi":
        engine = Engine(task, client_statistic=LocalAgreement())
        run(engine, Static(task.init_hparams), num_rounds=rounds, eval_every=eval_every)
        return
    storage = {
        "memory": None,
        "journal": f"{folder}/j{k}.log",
        "sqlite": f"sqlite:///{folder}/s{k}.db",
        "sqlite+checkpoint": f"sqlite:///{folder}/c{k}.db",
    }[case]
    checkpoint = f"{folder}/c{k}.npz" if case == "sqlite+checkpoint" else None
    fathom_tune.optimize(
        task, config=FROZEN, num_rounds=rounds, eval_every=eval_every, storage=storage, checkpoint=checkpoint
    )


@pytest.fixture(scope="module")
def timings():
    task = fathom_tune.tasks.digits()
    ends: list[float] = []
    real = Engine.run_round

    def noted(self, state, hparams):
        out = real(self, state, hparams)
        ends.append(time.perf_counter())
        return out

    Engine.run_round = noted
    out = {case: {"per_round": [], "whole": []} for case in CASES}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for case in CASES:  # compile everything once
                _one(case, task, folder, -1, rounds=20)
            for k in range(REPEATS):
                for case in CASES:
                    ends.clear()
                    start = time.perf_counter()
                    _one(case, task, folder, k)
                    out[case]["whole"].append(time.perf_counter() - start)
                    out[case]["per_round"].append(np.diff(ends))
    finally:
        Engine.run_round = real
    return out


def _window(per_round: list[np.ndarray], lo: int, hi: int) -> float:
    """Median seconds per round over rounds lo..hi, the median over repetitions."""
    return statistics.median(float(np.median(d[lo - 1 : hi - 1])) for d in per_round)


def test_fathom_overhead_per_round(timings):
    early, late = (100, 200), (ROUNDS - 100, ROUNDS)
    base = {w: _window(timings["fedavg"]["per_round"], *w) for w in (early, late)}
    print(f"\ndigits, {ROUNDS} rounds, {REPEATS} repetitions (median); ms per round and ratio to FedAvg")
    print(f"{'case':>18} {'r100-200':>9} {'ratio':>6} {f'r{late[0]}-{late[1]}':>11} {'ratio':>6} {'late/early':>10} {'whole run s':>11}")
    for case in CASES:
        e, l = (_window(timings[case]["per_round"], *w) for w in (early, late))
        whole = statistics.median(timings[case]["whole"])
        print(
            f"{case:>18} {1e3 * e:9.3f} {e / base[early]:6.2f} {1e3 * l:11.3f} {l / base[late]:6.2f} "
            f"{l / e:10.2f} {whole:11.2f}"
        )
    assert all(len(d) == ROUNDS - 1 for c in CASES for d in timings[c]["per_round"])


@pytest.mark.parametrize("case", CASES)
def test_whole_run(benchmark, case):
    """pytest-benchmark's own table of whole runs (fixed costs included)."""
    task = fathom_tune.tasks.digits()
    benchmark.group = f"digits, {ROUNDS} rounds, whole run"
    with tempfile.TemporaryDirectory() as folder:
        counter = iter(range(100))
        benchmark.pedantic(lambda: _one(case, task, folder, next(counter)), rounds=2, warmup_rounds=1)
