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
    inside: list[float] = []
    real = Engine.run_round

    def noted(self, state, hparams):
        start = time.perf_counter()
        out = real(self, state, hparams)
        ends.append(time.perf_counter())
        inside.append(ends[-1] - start)
        return out

    Engine.run_round = noted
    out = {case: {"per_round": [], "whole": [], "inside": []} for case in CASES}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for case in CASES:  # compile everything once
                _one(case, task, folder, -1, rounds=20)
            for k in range(REPEATS):
                for case in CASES:
                    ends.clear()
                    inside.clear()
                    start = time.perf_counter()
                    _one(case, task, folder, k)
                    out[case]["whole"].append(time.perf_counter() - start)
                    out[case]["per_round"].append(np.diff(ends))
                    out[case]["inside"].append(np.array(inside[1:]))
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
    print(
        f"{'case':>18} {'r100-200':>9} {'ratio':>6} {f'r{late[0]}-{late[1]}':>11} {'ratio':>6} "
        f"{'late/early':>10} {'whole run s':>11} {'in round':>9} {'between':>8}"
    )
    for case in CASES:
        e, l = (_window(timings[case]["per_round"], *w) for w in (early, late))
        whole = statistics.median(timings[case]["whole"])
        # Rounds 100-200 split into the engine's round (compiled call, batch plans) and
        # what runs between two rounds (the schedule, the loop's row, the writes).
        inside = _window(timings[case]["inside"], *early)
        print(
            f"{case:>18} {1e3 * e:9.3f} {e / base[early]:6.2f} {1e3 * l:11.3f} {l / base[late]:6.2f} "
            f"{l / e:10.2f} {whole:11.2f} {1e3 * inside:9.3f} {1e3 * (e - inside):8.3f}"
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


def test_phi_and_h_cost_per_local_step():
    """What FATHOM adds inside the engine's compiled call, by local steps per round.

    The digits block call (5 clients, B = 20) timed alone (dispatch to result)
    at E = 0.25, 1 and 4 (1, 4 and 13 local steps): plain FedAvg, FedAvg with
    FATHOM's client statistic phi, and with phi and FATHOM's server side
    (``track_agreement``: H and m). Paired differences per repetition, median of
    the repetitions: phi's cost grows with the local steps, H's is once a round.
    """
    import dataclasses

    import jax

    from fathom_tune.engine import FEDAVG_SERVER
    from fathom_tune.fathom import track_agreement

    task = fathom_tune.tasks.digits()
    engines = {
        "fedavg": Engine(task),
        "phi": Engine(task, client_statistic=LocalAgreement()),
        "phi+H": Engine(task, client_statistic=LocalAgreement(), server_optimizer=track_agreement(FEDAVG_SERVER, 0.5)),
    }
    epochs = (0.25, 1.0, 4.0)
    sizes = [len(task.train.get_client(c)) for c in task.train.client_ids()]
    typical = int(np.median(sizes))  # steps are shown for a client of the median size
    times: dict = {}
    for e in epochs:
        hp = dataclasses.replace(task.init_hparams, local_epochs=e)
        for engine in engines.values():
            run(engine, Static(hp), num_rounds=3, eval_every=1000)  # compile
    for _ in range(max(REPEATS, 5)):
        for e in epochs:
            hp = dataclasses.replace(task.init_hparams, local_epochs=e)
            for name, engine in engines.items():
                programs, calls = engine._programs, []
                real = programs.block_round

                def timed(*args, real=real, calls=calls):
                    start = time.perf_counter()
                    out = jax.block_until_ready(real(*args))
                    calls.append(time.perf_counter() - start)
                    return out

                programs.block_round = timed
                try:
                    run(engine, Static(hp), num_rounds=60, eval_every=10**6)
                finally:
                    programs.block_round = real
                times.setdefault((e, name), []).append(float(np.median(calls)))
    print("\ndigits block call (us, median of repetitions), and FATHOM's parts by paired difference")
    print(f"{'E':>5} {'steps':>5} {'fedavg':>7} {'phi':>7} {'phi+H':>7} {'phi':>6} {'per step':>8} {'H':>6}")
    for e in epochs:
        t = {name: np.array(times[(e, name)]) * 1e6 for name in engines}
        steps = dataclasses.replace(task.init_hparams, local_epochs=e).local_steps(typical)
        phi = float(np.median(t["phi"] - t["fedavg"]))
        h = float(np.median(t["phi+H"] - t["phi"]))
        print(
            f"{e:5g} {steps:5d} {np.median(t['fedavg']):7.0f} {np.median(t['phi']):7.0f} "
            f"{np.median(t['phi+H']):7.0f} {phi:6.0f} {phi / steps:8.0f} {h:6.0f}"
        )
    assert all(len(v) >= 5 for v in times.values())
