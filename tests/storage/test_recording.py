"""FATHOM's rounds written in batches: the same study as the ask-and-tell protocol, fewer transactions."""

from __future__ import annotations

import dataclasses
import datetime
import math
import threading
import time

import optuna
import pytest
import sqlalchemy
from _toy import toy_task
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

import fathom_tune
from fathom_tune import Bounds, FathomConfig, FathomSampler, HParams, record
from fathom_tune.engine import Engine
from fathom_tune.fathom import (
    LocalAgreement,
    ServerTracker,
    local_hypergradient,
    report_divergence,
    report_round,
)
from fathom_tune.storage.bulk import add_trials
from fathom_tune.tuning import driver as _one_run
from fathom_tune.tuning.driver import Writes

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ add_trials
def _template(i: int) -> FrozenTrial:
    moment = datetime.datetime(2026, 1, 1, 12, 0, i % 60, 123456)
    dist = FloatDistribution(1e-3, 1.0, log=True)
    state = TrialState.FAIL if i % 7 == 0 else TrialState.COMPLETE
    value = None if state == TrialState.FAIL else (math.inf if i % 5 == 0 else 1.0 / (i + 1))
    return FrozenTrial(
        number=0,
        trial_id=0,
        state=state,
        value=value,
        datetime_start=moment,
        datetime_complete=moment,
        params={"learning_rate": 0.1 + i * 1e-4, "k": 1 + i % 5},
        distributions={"learning_rate": dist, "k": IntDistribution(1, 5)},
        user_attrs={"round": i, "cost": {"rounds": 1}, "evals": [{"val_accuracy": 0.5}], "g": -0.25},
        system_attrs={"s": [1, 2]},
        intermediate_values={0: 0.5, 3: -math.inf},
    )


def _fields(trials):
    return [
        (t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
         t.intermediate_values, t.datetime_start, t.datetime_complete)
        for t in trials
    ]


def _storage(kind: str, path):
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path) + ".log"))
    if kind == "sqlite-cached":  # what optuna.create_study(storage=url) builds
        return optuna.storages.get_storage(f"sqlite:///{path}.db")
    return fathom_tune.open_storage(f"sqlite:///{path}.db")


@pytest.mark.parametrize("kind", ["memory", "journal", "sqlite", "sqlite-cached"])
def test_add_trials_writes_what_optuna_add_trials_writes(tmp_path, kind):
    templates = [_template(i) for i in range(30)]
    studies = {}
    for how in ("optuna", "batched"):
        study = optuna.create_study(storage=_storage(kind, tmp_path / how), study_name="s")
        study.add_trial(_template(99))  # numbering continues after an existing trial
        if how == "optuna":
            study.add_trials(templates)
        else:
            add_trials(study, templates[:10])
            add_trials(study, templates[10:])
        studies[how] = study
    if kind != "memory":  # read back through a fresh storage object
        studies = {how: optuna.load_study(study_name="s", storage=_storage(kind, tmp_path / how)) for how in studies}
    assert _fields(studies["batched"].trials) == _fields(studies["optuna"].trials)
    assert [t.number for t in studies["batched"].trials] == list(range(31))


def test_add_trials_is_one_transaction_per_batch(tmp_path):
    storage = fathom_tune.open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=storage, study_name="s")
    commits = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    add_trials(study, [_template(i) for i in range(50)])
    assert len(commits) == 1 and len(study.trials) == 50

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(storage=journal, study_name="s")
    appends = []
    real = journal._backend.append_logs
    journal._backend.append_logs = lambda logs: (appends.append(len(logs)), real(logs))
    add_trials(study, [_template(i) for i in range(50)])
    assert appends == [50] and len(study.trials) == 50


def test_add_trials_refuses_an_unfinished_template():
    study = optuna.create_study()
    running = _template(1)
    running.state = TrialState.RUNNING
    with pytest.raises(ValueError, match="must be finished, got state RUNNING"):
        add_trials(study, [_template(2), running])
    assert study.trials == []


def test_writes_run_in_order_and_raise_a_failed_job_in_the_caller():
    writes, order = Writes(threaded=True), []
    gate = threading.Event()
    writes.submit(lambda: (gate.wait(5), order.append(1)))
    assert writes.busy()
    gate.set()
    writes.submit(lambda: order.append(2))  # waits for the first
    writes.drain()
    assert order == [1, 2] and not writes.busy()

    def fail():
        raise OSError("disk full")

    writes.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writes.drain()
    writes.close()


@pytest.mark.parametrize("tuner", ["fathom", "fedex", "fedhyper-gm"])
def test_every_one_run_tuner_writes_its_batches_off_the_training_thread(tmp_path, monkeypatch, tuner):
    # One writer for every one-run tuner: on a persistent storage its batches are
    # written on the writer's thread (overlapping training), in memory inline.
    threads = []
    real = _one_run.add_trials

    def spy(study, trials):
        threads.append(threading.current_thread().name)
        return real(study, trials)

    monkeypatch.setattr(_one_run, "add_trials", spy)
    task = toy_task().replace(num_rounds=5, eval_every=2)
    out = fathom_tune.tuners.get(tuner).run(task, storage=f"sqlite:///{tmp_path}/s.db", checkpoint_dir=tmp_path)
    assert len(out.study.trials) == 5
    assert threads and all(name.startswith("fathom_tune-writes") for name in threads), threads
    threads.clear()
    out = fathom_tune.tuners.get(tuner).run(task, seed=1)
    assert len(out.study.trials) == 5
    assert threads and set(threads) == {threading.main_thread().name}, threads


# ------------------------------------------------------- the study FATHOM writes
def _ask_and_tell(task, rounds: int, eval_every: int, config: FathomConfig) -> optuna.Study:
    """FATHOM through the public ask-and-tell protocol (one storage call at a time), on
    the same engine: the study ``optimize`` must write, whatever its batching."""
    config = config.resolve(task)
    engine = Engine(task, client_statistic=LocalAgreement())
    sampler = FathomSampler(init=config.init, bounds=config.bounds, config=config, seed=0)
    study = optuna.create_study(sampler=sampler)
    state = engine.init()
    tracker = ServerTracker.init(state.params, alpha=config.alpha)
    for r in range(rounds):
        trial = study.ask()
        trial.set_user_attr(record.ROUND, r)
        new, result = engine.run_round(state, sampler.suggest(trial))
        metrics = None
        if result.finite and ((r + 1) % eval_every == 0 or r == rounds - 1):
            metrics = engine.evaluate(new.params, "validation")
        evals = [] if metrics is None else [record.evaluation(1, result.cost.examples, metrics)]
        record.write_step(trial, cost=result.cost, evals=evals, local_steps=int(result.local_steps.sum()))
        if result.finite:
            state = new
            h, tracker = tracker.update(result.update)
            report_round(trial, G=local_hypergradient(result.statistic, result.num_examples), H=float(h))
            study.tell(trial, result.train_loss)
        else:
            state = dataclasses.replace(state, round=state.round + 1)  # the model is discarded
            report_divergence(trial)
            study.tell(trial, state=TrialState.FAIL)
    return study


def _content(study: optuna.Study):
    out = []
    for t in study.trials:
        attrs = dict(t.user_attrs)
        attrs[record.COST] = {k: v for k, v in attrs[record.COST].items() if k != "seconds"}
        out.append((t.state, t.value, t.params, t.distributions, attrs))
    return out


@pytest.mark.parametrize(
    "kind, config",
    [
        ("memory", FathomConfig()),
        ("sqlite", FathomConfig()),
        # overflows float32 at first: the learning rate is halved round after round
        ("journal", FathomConfig(init=HParams(1e38, 1.0, 8.0), bounds=Bounds(HParams(1e-4, 0.01, 1.0), HParams(1e38, 10.0, 256.0)))),
    ],
)
def test_optimize_writes_the_study_of_the_ask_and_tell_protocol(tmp_path, kind, config):
    task, rounds = toy_task(), 9
    storage = {"memory": None, "sqlite": f"sqlite:///{tmp_path}/s.db", "journal": str(tmp_path / "j.log")}[kind]
    # the protocol is the paper's FATHOM: its non-finite rounds are recorded as without the
    # safety net (which adds why and what it did); rounds that never blow up are the same either way
    net = None if kind == "journal" else fathom_tune.SafetyNet()
    result = fathom_tune.optimize(
        task, config=config, num_rounds=rounds, eval_every=2, storage=storage, checkpoint_every=4, safety_net=net
    )
    expected = _ask_and_tell(task, rounds, 2, config)
    if kind == "journal":
        assert [t.state for t in expected.trials][:2] == [TrialState.FAIL] * 2  # the case is exercised
    study = optuna.load_study(study_name="toy/fathom/seed0", storage=fathom_tune.open_storage(storage)) if storage else result.study
    assert _content(study) == _content(expected)
    assert result.hparams == FathomSampler(
        init=config.resolve(task).init, bounds=config.resolve(task).bounds, config=config.resolve(task)
    ).next_hparams(expected)


def test_rounds_are_written_in_one_transaction_per_batch(tmp_path):
    storage = fathom_tune.open_storage(f"sqlite:///{tmp_path}/s.db")
    batches, writing = [], set()

    def statement(conn, cursor, text, *args):
        if text.lstrip().upper().startswith("INSERT INTO TRIALS "):
            writing.add(id(conn))

    def commit(conn):
        if id(conn) in writing:  # a transaction that created trials
            writing.discard(id(conn))
            batches.append(1)

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", statement)
    sqlalchemy.event.listen(storage.engine, "commit", commit)
    fathom_tune.optimize(toy_task(), num_rounds=8, storage=storage, checkpoint_every=3, flush_seconds=3600)
    assert len(batches) == 3  # rounds 0-2, 3-5, 6-7
    fathom_tune.optimize(toy_task(), seed=1, num_rounds=8, storage=storage, flush_seconds=3600)
    assert len(batches) == 4  # all 8 rounds at the end
    assert len(optuna.load_study(study_name="toy/fathom/seed1", storage=storage).trials) == 8


def test_each_round_is_visible_in_the_storage_within_two_seconds(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/s.db"
    real = Engine.run_round
    lag = []
    finished_at = {}

    def slow_round(self, state, hparams):
        # each round takes 0.3 s; before it starts, look at what a reader sees
        now = time.monotonic()
        try:
            seen = len(optuna.load_study(study_name="toy/fathom/seed0", storage=url).trials)
        except KeyError:
            seen = 0
        lag.extend(now - finished_at[r] for r in range(seen, state.round) if r in finished_at)
        time.sleep(0.3)
        out = real(self, state, hparams)
        finished_at[state.round] = time.monotonic()
        return out

    monkeypatch.setattr(Engine, "run_round", slow_round)
    fathom_tune.optimize(toy_task(), num_rounds=14, eval_every=100, storage=url)
    assert lag, "every round was visible at once: the batching was not exercised"
    assert max(lag) < 2.0, lag


def test_flush_seconds_is_validated():
    with pytest.raises(ValueError, match=r"flush_seconds must be a finite number >= 0, got -1"):
        fathom_tune.optimize(toy_task(), num_rounds=2, flush_seconds=-1)
    with pytest.raises(TypeError, match="flush_seconds"):
        fathom_tune.optimize(toy_task(), num_rounds=2, flush_seconds="1")


@pytest.mark.parametrize("kind", ["memory", "journal", "sqlite", "sqlite-cached"])
def test_study_attrs_are_set_in_one_transaction(tmp_path, kind):
    from fathom_tune.storage.bulk import set_study_attrs

    storage = _storage(kind, tmp_path / "s")
    study = optuna.create_study(storage=storage, study_name="s")
    study.set_user_attr("kept", 1)
    study.set_user_attr("changed", {"a": 1})
    commits = []
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is not None:
        sqlalchemy.event.listen(engine, "commit", lambda conn: commits.append(1))
    set_study_attrs(study, {"changed": {"a": [2, 3]}, "new": None, "text": "x"})
    if engine is not None:
        assert len(commits) == 1
    again = optuna.load_study(study_name="s", storage=storage)
    assert again.user_attrs == {"kept": 1, "changed": {"a": [2, 3]}, "new": None, "text": "x"}


def test_add_trials_in_memory_keeps_plain_trials_of_their_own():
    """In memory the templates are not deep-copied; the stored trials are still plain
    FrozenTrials whose dicts are their own (changing a template's dicts changes nothing)."""
    study = optuna.create_study()
    templates = [_template(i) for i in range(3)]
    add_trials(study, templates)
    for t in templates:
        t.user_attrs["round"] = -1
        t.params["k"] = 99
        t.distributions.clear()
    stored = study.get_trials(deepcopy=False)
    assert [type(t) for t in stored] == [FrozenTrial] * 3
    assert [t.user_attrs["round"] for t in stored] == [0, 1, 2]
    assert [t.params["k"] for t in stored] == [1, 2, 3]
    assert all(set(t.distributions) == {"learning_rate", "k"} for t in stored)
    assert _fields(stored) == _fields(study.trials)  # and Optuna's own copies read the same
