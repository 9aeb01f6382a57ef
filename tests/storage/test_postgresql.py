"""FATHOM and the baselines on a real PostgreSQL server.

A throwaway server (tests/_postgres.py: ``initdb`` into a temporary directory,
``pg_ctl start`` on 127.0.0.1) runs for this module; every test gets its own
database. The module is skipped, saying why, only where the server's binaries
are absent (``.ci/run`` installs Debian's ``postgresql``) or it cannot start.
"""

import contextlib
import dataclasses
import io
import logging
import threading
import time

import optuna
import pandas as pd
import pytest
from _jobs import SPACE, STALL_ROUND, kill, short_toy, trials_of, wait_until
from _postgres import USER, Unavailable, server, start_job
from _toy import flat, toy_task
from optuna.trial import TrialState

import baselines
import fathom_tune
from baselines._objective import origin
from fathom_tune import fedavg, record

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROUNDS = 10
"""Rounds of the FATHOM runs (``_jobs.py fathom`` evaluates every 2 and stalls in round 5)."""
NAME = "toy/fathom/seed0"
SECRET = "s3cr3t-pw"
"""A password in the URLs; trust authentication ignores it, and nothing may print it."""
TIMING = {"seconds", "compile_seconds"}


@pytest.fixture(scope="module")
def postgres():
    stack = contextlib.ExitStack()
    try:
        srv = stack.enter_context(server())
    except Unavailable as exc:
        pytest.skip(str(exc))
    with stack:
        yield srv


def _with_password(url: str) -> str:
    return url.replace(f"//{USER}@", f"//{USER}:{SECRET}@")


def _untimed(x):
    """``x`` without wall times (they differ between any two runs)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING and k != record.WALL}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _contents(url: str, name: str = NAME):
    """Everything the study holds but times and row ids, read through a fresh connection."""
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        head = {
            "directions": study.directions,
            "user_attrs": _untimed(study.user_attrs),
            "system_attrs": storage.get_study_system_attrs(study._study_id),
        }
        trials = [
            {
                "number": t.number,
                "state": t.state,
                "values": t.values,
                "params": t.params,
                "distributions": t.distributions,
                "user_attrs": _untimed(t.user_attrs),
                "system_attrs": t.system_attrs,
                "intermediate_values": t.intermediate_values,
                "started": t.datetime_start is not None,
                "completed": t.datetime_complete is not None,
            }
            for t in study.get_trials(deepcopy=False)
        ]
        return head, trials
    finally:
        storage.engine.dispose()


def _check_same_record(a: record.RunRecord, b: record.RunRecord, check_dtype: bool = True) -> None:
    """Two run records hold the same numbers (wall times aside; columns in any order)."""
    for field in (
        "task",
        "tuner",
        "seed",
        "unit",
        "target",
        "rounds_per_run",
        "budget_rounds",
        "budget_examples",
        "config",
        "hparams",
        "validation",
        "test",
    ):
        assert getattr(a, field) == getattr(b, field), field
    assert dataclasses.replace(a.ledger, seconds=0.0) == dataclasses.replace(b.ledger, seconds=0.0)
    pd.testing.assert_frame_equal(
        a.steps.drop(columns="seconds"),
        b.steps.drop(columns="seconds"),
        check_exact=True,
        check_dtype=check_dtype,
    )  # columns in the same order too, whatever order the storage lists attributes in
    pd.testing.assert_frame_equal(a.evaluations, b.evaluations, check_exact=True, check_like=True)


TASK = toy_task()
"""The task of every FATHOM run in this process (one task: its engines share compiled programs)."""


def _run_fathom(url: str, checkpoint):
    return fathom_tune.optimize(
        TASK, num_rounds=ROUNDS, eval_every=2, storage=url, checkpoint=checkpoint, progress=False
    )


@pytest.fixture(scope="module")
def fathom_pg(postgres, tmp_path_factory):
    """An uninterrupted checkpointed FATHOM run on PostgreSQL, its URL holding a password;
    returns (url, result, what it printed and logged)."""
    url = postgres.create_database("fathom")
    printed, handler = io.StringIO(), logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            res = _run_fathom(_with_password(url), tmp_path_factory.mktemp("pg") / "run.npz")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return url, res, printed.getvalue() + handler.stream.getvalue()


def test_fathom_run_on_postgresql_records_what_it_records_on_sqlite(fathom_pg, tmp_path):
    url, pg, output = fathom_pg
    sqlite = f"sqlite:///{tmp_path}/s.db"
    lite = _run_fathom(sqlite, tmp_path / "run.npz")
    assert SECRET not in output
    head, trials = _contents(url)
    assert SECRET not in repr((head, trials))
    # One COMPLETE trial per round, in order, holding the round's hyperparameters, G, H and cost.
    assert [(t["state"], t["user_attrs"][record.ROUND]) for t in trials] == [
        (TrialState.COMPLETE, r) for r in range(ROUNDS)
    ]
    history = pg.history
    examples = 0
    for t, row in zip(trials, history.itertuples()):
        assert t["params"] == {
            n: getattr(row, n) for n in ("learning_rate", "local_epochs", "batch_size")
        }
        assert (
            t["user_attrs"][record.FATHOM_G] == row.G and t["user_attrs"][record.FATHOM_H] == row.H
        )
        examples += t["user_attrs"][record.COST]["examples"]
        assert (t["user_attrs"][record.LOCAL_STEPS], examples) == (row.local_steps, row.examples)
    assert [len(t["user_attrs"][record.EVALS]) for t in trials] == [r % 2 for r in range(ROUNDS)]
    # Bit for bit what the same run records on SQLite.
    assert (head, trials) == _contents(sqlite)
    assert all(flat(pg.params) == flat(lite.params))
    pd.testing.assert_frame_equal(
        history.drop(columns="seconds"), lite.history.drop(columns="seconds"), check_exact=True
    )
    # The record reader gives the same numbers from either storage, and the run's own.
    study = optuna.load_study(study_name=NAME, storage=url)
    run = record.read_run(study)
    _check_same_record(run, record.read_run(optuna.load_study(study_name=NAME, storage=sqlite)))
    assert run.ledger == pg.cost and run.hparams == pg.hparams and run.test == pg.test_metrics
    assert list(run.evaluations["rounds"]) == list(range(2, ROUNDS + 1, 2))


def test_sigkilled_fathom_run_on_postgresql_resumes_to_the_uninterrupted_result(
    postgres, fathom_pg, tmp_path
):
    ref_url, ref, _ = fathom_pg
    # The URL as the README gives it: SQLAlchemy's default driver (psycopg 3 from SQLAlchemy 2.1).
    url = postgres.create_database("fathom_killed").replace(
        "postgresql+psycopg2://", "postgresql://"
    )
    ckpt, marker = tmp_path / "run.npz", tmp_path / "stalled"
    # writes rounds and checkpoint every 2 rounds; hangs inside round 5, round 4 queued
    proc = start_job(marker, "fathom", _with_password(url), ckpt, ROUNDS, "round")
    wait_until(marker.exists, proc)
    kill(proc)
    assert SECRET not in proc.stdout.read().decode()
    _, before = _contents(url)
    assert [(t["state"], t["user_attrs"][record.ROUND]) for t in before] == [
        (TrialState.COMPLETE, r) for r in range(STALL_ROUND - 1)
    ]

    resumed = _run_fathom(_with_password(url), ckpt)
    assert all(flat(resumed.params) == flat(ref.params))
    pd.testing.assert_frame_equal(
        resumed.history.drop(columns="seconds"),
        ref.history.drop(columns="seconds"),
        check_exact=True,
    )
    assert dataclasses.replace(resumed.cost, seconds=0.0) == dataclasses.replace(
        ref.cost, seconds=0.0
    )
    head, after = _contents(url)
    ref_head, ref_trials = _contents(ref_url)
    assert head == ref_head
    # The rounds written before the kill are kept as they were; the lost round 4 was run
    # again from the checkpoint: the study is what the uninterrupted run recorded.
    assert after[: len(before)] == before
    assert after == ref_trials
    run = record.read_run(optuna.load_study(study_name=NAME, storage=url))
    ref_run = record.read_run(optuna.load_study(study_name=NAME, storage=ref_url))
    _check_same_record(run, ref_run)


BASELINE_TASK = short_toy()
"""The task of the jobs' baseline workers; the runs in this process share its compiled programs."""


def _worker(url, ckdir, budget: int, worker: int):
    """A baseline worker as ``_jobs.py baseline`` runs it, in this process."""
    return baselines.run(
        BASELINE_TASK,
        "random",
        space=SPACE,
        budget_rounds=budget,
        storage=url,
        worker=worker,
        checkpoint_dir=ckdir,
        heartbeat=(1, 3),
        progress=False,
    )


def test_two_baseline_workers_on_postgresql_one_sigkilled_and_retried(postgres, tmp_path):
    url, name = postgres.create_database("baselines"), "toy/random/seed0"
    ckdir, marker, budget = tmp_path / "ck", tmp_path / "stalled", 8 * 6
    ckdir.mkdir()
    # Worker 0, in a child process, hangs right after its first trial's first checkpoint
    # (round 4 of 8). Worker 1 runs in this process once that trial exists (so that it
    # cannot take the whole budget first); worker 0 is SIGKILLed when it hangs and worker 1
    # has finished a trial beside it.
    victim = start_job(marker, "baseline", url, ckdir, 0, budget, 1)
    wait_until(lambda: trials_of(url, name), victim)
    seen = {}

    def kill_when_stalled():
        try:
            wait_until(
                lambda: (
                    marker.exists()
                    and any(t.state == TrialState.COMPLETE for t in trials_of(url, name))
                ),
                victim,
            )
            seen["trials"] = trials_of(url, name)
            kill(victim)
            seen["at"] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            seen["error"] = exc

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    try:
        _worker(url, ckdir, budget, worker=1)
        killer.join(timeout=360)
    finally:
        if victim.poll() is None and "at" not in seen:  # worker 1 failed, or no stall came
            victim.kill()
    if "error" in seen:
        raise seen["error"]
    (killed,) = [
        t
        for t in seen["trials"]
        if t.state == TrialState.RUNNING and t.user_attrs.get(record.WORKER) == 0
    ]
    assert sorted(killed.intermediate_values) == [4]
    finished_before = {t.number: t.value for t in seen["trials"] if t.state == TrialState.COMPLETE}
    # Worker 0 again, past the heartbeat's 3 s grace: it retries the killed trial if
    # worker 1 has not.
    time.sleep(max(0.0, seen["at"] + 3.5 - time.monotonic()))
    _worker(url, ckdir, budget, worker=0)

    study = optuna.load_study(study_name=name, storage=url)
    trials = study.trials
    by_number = {t.number: t for t in trials}
    assert {n: by_number[n].value for n in finished_before} == finished_before
    assert by_number[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.number != killed.number and origin(t) == killed.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    (retry,) = retries
    assert retry.params == killed.params
    assert retry.intermediate_values[4] == killed.intermediate_values[4]  # inherited, not rerun
    # Nothing left running or waiting; every trial but the killed one either ran in full
    # or was refused by the budget at no cost.
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    refused = [t for t in trials if record.NOT_RUN in t.user_attrs]
    assert sorted(t.number for t in done + refused) == sorted(set(by_number) - {killed.number})
    assert all(
        record.step_cost(t) == fathom_tune.Cost() for t in refused + [by_number[killed.number]]
    )
    # The full budget, each run once: no origin completed twice, the ledger exact.
    assert len(done) == budget // 8
    origins = [origin(t) for t in done]
    assert len(set(origins)) == len(origins)
    run = record.read_run(study)
    spent = sum((record.step_cost(t) for t in trials), fathom_tune.Cost())
    assert dataclasses.replace(run.ledger, seconds=0.0) == dataclasses.replace(spent, seconds=0.0)
    assert run.ledger.rounds == run.budget_rounds == budget
    # Each run, the retried one included, ended where an uninterrupted run with its
    # hyperparameters ends: exactly, as PostgreSQL keeps the values as doubles; the retry,
    # which continued a checkpoint of the killed process, as the SQLite test checks it.
    for t in done:
        ref = fedavg(BASELINE_TASK, fathom_tune.HParams(**t.params), seed=0)
        if t.number == retry.number:
            assert t.value == pytest.approx(ref.validation_metrics["accuracy"], abs=1e-6)
        else:
            assert t.value == ref.validation_metrics["accuracy"], t.number
        assert record.step_cost(t).rounds == 8 and record.step_cost(t).examples == ref.cost.examples
        assert sorted(t.intermediate_values) == [4, 8]
    # The choice is recorded, and only its checkpoint is kept.
    chosen = baselines.choose(study)
    assert study.user_attrs[record.CHOSEN_TRIAL] == chosen.number
    assert run.hparams == fathom_tune.HParams(**chosen.params)
    assert [p.name for p in ckdir.iterdir() if p.suffix == ".npz"] == [f"trial{origin(chosen)}.npz"]


def test_an_unopenable_postgresql_url_is_refused_without_its_password(postgres):
    url = _with_password(postgres.url("no_such_database"))
    with pytest.raises(ValueError, match="cannot be opened") as info:
        fathom_tune.optimize(TASK, num_rounds=2, storage=url, progress=False)
    message = str(info.value)
    assert SECRET not in message and "***" in message and "no_such_database" in message


_OPEN_AT_ONCE = """
import pathlib, sys, time
import fathom_tune.storage as storage
go = pathlib.Path(sys.argv[2])
pathlib.Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.001)
storage.open_storage(sys.argv[1], heartbeat=(1, 3))
print("opened", flush=True)
"""


def test_processes_opening_a_fresh_database_at_once_all_succeed(postgres, tmp_path):
    # Optuna creates its tables on the first open; without the advisory lock, processes
    # doing that at one moment collide (a unique violation on an enum type).
    import subprocess
    import sys

    url, go = postgres.create_database("at_once"), tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, url, str(go), str(tmp_path / f"ready{k}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for k in range(4)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(4)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    assert all(o.strip().endswith("opened") for o in outputs)
    assert optuna.get_all_study_names(url) == []  # the tables exist, whole
