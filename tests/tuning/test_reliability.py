"""Crash-safe resume and concurrent workers: kill processes, resume, compare with uninterrupted runs."""

import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import optax
import optuna
import pytest
from _jobs import SPACE, STALL_ROUND, short_toy, trials_of
from _jobs import kill as _kill
from _jobs import wait_until as _wait_until
from _toy import crash_in_round, flat, toy_task
from optuna.trial import TrialState

import baselines
import fathom_tune
from baselines._objective import origin
from fathom_tune import fedavg
from fathom_tune.engine import Engine
from fathom_tune.record import ROUND as ROUND_ATTR
from fathom_tune.storage.checkpoint import load_checkpoint, save_checkpoint

optuna.logging.set_verbosity(optuna.logging.WARNING)

JOBS = pathlib.Path(__file__).resolve().parents[1] / "_jobs.py"
ROOT = JOBS.parent.parent


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(JOBS), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _table(trials) -> str:
    """The trials, one line each, for a failing assertion's message."""
    return "\n".join(
        f"{t.number} {t.state.name} worker={t.user_attrs.get('worker')} "
        f"rounds={t.user_attrs.get('rounds')} not_run={t.user_attrs.get('not_run')} "
        f"retry_of={t.system_attrs.get('failed_trial')} done={t.datetime_complete}"
        for t in trials
    )


def _rounds(trials) -> dict[int, list]:
    out: dict[int, list] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out.setdefault(t.user_attrs[ROUND_ATTR], []).append(t)
    return out


# --------------------------------------------------------------- FATHOM


@pytest.mark.parametrize(
    "stall, written, checkpointed",
    [
        # killed inside round 5: rounds 0-3 were written with the checkpoint at 4,
        # round 4 was queued and is lost with the process
        ("round", STALL_ROUND - 1, STALL_ROUND - 1),
        # killed after rounds 0-3 were committed, before their checkpoint (at 2 then)
        ("write", STALL_ROUND - 1, STALL_ROUND - 3),
    ],
)
def test_sigkilled_fathom_run_resumes_to_the_uninterrupted_result(tmp_path, stall, written, checkpointed):
    rounds, name = 12, "toy/fathom/seed0"
    url, ckpt = f"sqlite:///{tmp_path}/s.db", tmp_path / "run.npz"
    proc = _start("fathom", url, ckpt, rounds, stall)
    _wait_until(pathlib.Path(f"{ckpt}.stalled").exists, proc)
    _kill(proc)
    before = {r: ts[0].value for r, ts in _rounds(trials_of(url, name)).items()}
    assert sorted(before) == list(range(written))
    meta, _ = load_checkpoint(ckpt, kind="fathom", templates={})
    assert meta["round"] == checkpointed

    resumed = fathom_tune.optimize(
        toy_task(), num_rounds=rounds, eval_every=2, storage=url, checkpoint=ckpt, progress=False
    )
    plain = fathom_tune.optimize(toy_task(), num_rounds=rounds, eval_every=2, progress=False)
    assert np.array_equal(flat(resumed.params), flat(plain.params))
    for col in ("learning_rate", "local_epochs", "batch_size", "train_loss", "H", "G"):
        assert list(resumed.history[col]) == list(plain.history[col]), col
    assert list(resumed.history["round"]) == list(range(rounds))
    assert resumed.cost.examples == plain.cost.examples
    # Every round is in the study exactly once, as the uninterrupted run wrote it;
    # rounds are written finished, so a kill leaves no running trial behind.
    assert [t.state for t in resumed.study.trials] == [TrialState.COMPLETE] * rounds
    done = _rounds(resumed.study.trials)
    assert sorted(done) == list(range(rounds))
    assert {r: done[r][0].value for r in before} == before
    for mine, theirs in zip(resumed.study.trials, plain.study.trials):
        assert (mine.params, mine.value) == (theirs.params, theirs.value)
        assert {k: v for k, v in mine.user_attrs.items() if k != "cost"} == {
            k: v for k, v in theirs.user_attrs.items() if k != "cost"
        }


class _Crash(Exception):
    pass


def test_resume_replays_rounds_the_study_holds_past_the_checkpoint(tmp_path, monkeypatch):
    # Writes every 3 rounds; the process dies after rounds 3-5 were committed, before
    # their checkpoint (at round 3 then) was written.
    task, rounds, url, ckpt = toy_task(), 8, f"sqlite:///{tmp_path}/s.db", tmp_path / "c.npz"
    real_save = fathom_tune.storage.checkpoint.save_run

    def save_run(path, *, progress, **kwargs):
        if progress.state.round == 6:
            raise _Crash
        return real_save(path, progress=progress, **kwargs)

    server = optax.sgd(1.0, momentum=0.5)  # an optimizer state to restore
    kwargs = {"seed": 3, "num_rounds": rounds, "eval_every": 2, "storage": url, "progress": False}
    kwargs.update(server_optimizer=server, checkpoint_every=3, flush_seconds=3600)
    monkeypatch.setattr(fathom_tune.storage.checkpoint, "save_run", save_run)
    with pytest.raises(_Crash):
        fathom_tune.optimize(task, checkpoint=ckpt, **kwargs)
    meta, _ = load_checkpoint(ckpt, kind="fathom", templates={})  # the metadata alone
    assert meta["round"] == 3 and meta["history"]["rows"] == 3
    assert [t.user_attrs[ROUND_ATTR] for t in trials_of(url, "toy/fathom/seed3")] == list(range(6))
    monkeypatch.setattr(fathom_tune.storage.checkpoint, "save_run", real_save)

    resumed = fathom_tune.optimize(task, checkpoint=ckpt, **kwargs)
    plain_kwargs = {**kwargs, "storage": f"sqlite:///{tmp_path}/plain.db"}
    plain = fathom_tune.optimize(task, checkpoint=tmp_path / "plain.npz", **plain_kwargs)
    assert np.array_equal(flat(resumed.params), flat(plain.params))
    templates = {"params": plain.params, "opt_state": server.init(plain.params), "momentum": plain.params}
    _, end_resumed = load_checkpoint(ckpt, kind="fathom", templates=templates)
    _, end_plain = load_checkpoint(tmp_path / "plain.npz", kind="fathom", templates=templates)
    for name in ("opt_state", "momentum"):  # the server optimizer's state and m were restored
        assert np.array_equal(flat(end_resumed[name]), flat(end_plain[name])), name
    assert list(resumed.history["H"]) == list(plain.history["H"])  # m was restored
    # Rounds 0-5 from the first process (3-5 replayed, not written again), then 6-7.
    states = [(t.state, t.user_attrs.get(ROUND_ATTR)) for t in resumed.study.trials]
    assert states == [(TrialState.COMPLETE, r) for r in range(rounds)]
    assert [t.value for t in resumed.study.trials] == [t.value for t in plain.study.trials]
    # A finished run resumed again does no more rounds and writes nothing new.
    again = fathom_tune.optimize(task, checkpoint=ckpt, **kwargs)
    assert len(again.study.trials) == len(resumed.study.trials)
    assert np.array_equal(flat(again.params), flat(plain.params))


def test_an_interrupt_writes_the_queued_rounds_and_their_checkpoint(tmp_path, monkeypatch):
    task, url, ckpt = toy_task(), f"sqlite:///{tmp_path}/s.db", tmp_path / "c.npz"
    real = crash_in_round(monkeypatch, 5, KeyboardInterrupt)
    kwargs = {"num_rounds": 8, "eval_every": 2, "storage": url, "checkpoint": ckpt, "flush_seconds": 3600}
    with pytest.raises(KeyboardInterrupt):
        fathom_tune.optimize(task, **kwargs)
    # nothing was due before the interrupt; it wrote rounds 0-4 and the checkpoint after them
    assert [t.user_attrs[ROUND_ATTR] for t in trials_of(url, "toy/fathom/seed0")] == list(range(5))
    assert load_checkpoint(ckpt, kind="fathom", templates={})[0]["round"] == 5
    monkeypatch.setattr(Engine, "run_round", real)
    resumed = fathom_tune.optimize(task, **kwargs)
    plain = fathom_tune.optimize(task, num_rounds=8, eval_every=2)
    assert np.array_equal(flat(resumed.params), flat(plain.params))
    assert [t.value for t in resumed.study.trials] == [t.value for t in plain.study.trials]


def test_a_second_run_on_a_held_checkpoint_is_refused(tmp_path):
    import fcntl

    ckpt = tmp_path / "c.npz"
    with open(tmp_path / "c.npz.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="in use by another running process"):
            fathom_tune.optimize(
                toy_task(), num_rounds=2, storage=f"sqlite:///{tmp_path}/s.db", checkpoint=ckpt
            )
    assert not (tmp_path / "s.db").exists() or not optuna.get_all_study_names(
        f"sqlite:///{tmp_path}/s.db"
    )


def test_checkpoint_of_another_run_is_refused_and_nothing_is_written(tmp_path):
    url, ckpt = f"sqlite:///{tmp_path}/s.db", tmp_path / "c.npz"
    fathom_tune.optimize(toy_task(), num_rounds=2, storage=url, checkpoint=ckpt, progress=False)
    n = len(optuna.load_study(study_name="toy/fathom/seed0", storage=url).trials)
    with pytest.raises(fathom_tune.CheckpointError, match=r"another run.*num_rounds"):
        fathom_tune.optimize(toy_task(), num_rounds=3, storage=url, checkpoint=ckpt, progress=False)
    assert len(optuna.load_study(study_name="toy/fathom/seed0", storage=url).trials) == n


def test_resume_with_another_server_optimizer_is_refused_naming_it(tmp_path, monkeypatch):
    url, ckpt = f"sqlite:///{tmp_path}/s.db", tmp_path / "c.npz"
    kwargs = {"num_rounds": 3, "storage": url, "checkpoint": ckpt}
    real = crash_in_round(monkeypatch, 2, _Crash)
    with pytest.raises(_Crash):
        fathom_tune.optimize(toy_task(), server_optimizer=optax.adam(1e-3), **kwargs)
    monkeypatch.setattr(Engine, "run_round", real)
    n = len(optuna.load_study(study_name="toy/fathom/seed0", storage=url).trials)
    with pytest.raises(fathom_tune.CheckpointError, match=r"differs in engine\.server_optimizer"):
        fathom_tune.optimize(toy_task(), server_optimizer=optax.adam(1e-2), **kwargs)
    assert len(optuna.load_study(study_name="toy/fathom/seed0", storage=url).trials) == n
    resumed = fathom_tune.optimize(toy_task(), server_optimizer=optax.adam(1e-3), **kwargs)
    assert resumed.cost.rounds == 3 and len(resumed.study.trials) == 3  # rounds are written finished


def test_checkpoint_needs_a_persistent_storage(tmp_path):
    with pytest.raises(ValueError, match="checkpoint needs a persistent storage"):
        fathom_tune.optimize(toy_task(), num_rounds=2, checkpoint=tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_is_written_atomically_and_loads_without_pickle(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, kind="k", meta={"round": 1}, trees={"w": [np.ones(3, np.float32)]})
    loads = []
    real_load = np.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    meta, trees = load_checkpoint(path, kind="k", templates={"w": [np.zeros(3, np.float32)]})
    assert loads == [False]
    assert meta == {"round": 1} and trees["w"][0].tolist() == [1.0, 1.0, 1.0]

    # A crash in the middle of writing leaves the old checkpoint whole.
    def broken_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, kind="k", meta={"round": 2}, trees={"w": [np.zeros(3, np.float32)]})
    meta, _ = load_checkpoint(path, kind="k", templates={"w": [np.zeros(3, np.float32)]})
    assert meta == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


# ------------------------------------------------------------ baselines


def test_simultaneous_workers_fail_and_claim_a_stale_trial_once(tmp_path):
    # Four workers find the same stale trial at the same moment. Each may
    # fail it, but only one retry may be enqueued, and that retry (WAITING)
    # may be claimed by one worker only.
    url = f"sqlite:///{tmp_path}/s.db"
    storage = fathom_tune.open_storage(url)  # the workers' storages have the heartbeat
    study = optuna.create_study(study_name="race", storage=storage)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # the heartbeat is now older than the 2 s grace period
    go = tmp_path / "go"
    workers = [_start("stale", url, tmp_path / f"ready{w}", go) for w in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{w}").exists() for w in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers)
        time.sleep(0.05)
    go.touch()
    numbers = []
    for proc in workers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()[-3000:]
        numbers.append(int(out.split()[-1]))
    trials = optuna.load_study(study_name="race", storage=url).trials
    assert trials[dead.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params
    # Every worker got its own trial, and one of them got the retry.
    assert sorted(numbers) == [1, 2, 3, 4]
    assert len(trials) == 5 and retries[0].number in numbers


def test_a_stale_trial_keeps_its_budget_until_its_retry_exists(tmp_path, monkeypatch):
    # Optuna fails a stale trial and creates its retry in two writes. In between,
    # the failed trial must still hold its reservation, or another worker could
    # start a new trial with it and leave no room for the retry.
    task, url = short_toy(), f"sqlite:///{tmp_path}/s.db"
    storage = fathom_tune.open_storage(url, heartbeat=(1, 2))
    study = optuna.create_study(study_name="b", storage=storage, direction="maximize")
    budget = baselines._budget.Budget(task, SPACE, seed=0, rounds=16, examples=None, max_trials=None)
    done = optuna.trial.create_trial(
        params={"learning_rate": 0.1, "local_epochs": 1.0, "batch_size": 8.0},
        distributions={
            n: optuna.distributions.FloatDistribution(0.01, 20.0) for n in SPACE.lower.as_dict()
        },
        value=0.5,
        user_attrs={"cost": fathom_tune.Cost(rounds=8).as_dict()},
    )
    study.add_trial(done)  # 8 of the 16 rounds spent
    with pytest.warns(UserWarning, match="Heartbeat"):
        dead = study.ask()
    storage.record_heartbeat(dead._trial_id)
    assert budget.stop_reason(study) is not None  # the running trial holds the other 8
    # Its worker dies; the trial is failed as stale, its retry not yet created.
    storage.set_trial_state_values(dead._trial_id, TrialState.FAIL)
    assert budget.stop_reason(study) is not None
    assert budget.committed(study.get_trials(), retrying=True) == (16, 0)
    # Once the retry exists, it holds the reservation and is taken first.
    storage.get_heartbeat_stale_trial_callback()(study, study.trials[dead.number])
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["failed_trial"] == dead.number
    assert budget.stop_reason(study) is None
    assert budget.committed(study.get_trials(), retrying=True) == (16, 0)
    # A failed trial whose retry never came (its worker died in between) stops
    # holding budget after RETRY_WAIT seconds.
    storage.set_trial_state_values(retry._trial_id, TrialState.FAIL, None)
    with pytest.warns(UserWarning, match="Heartbeat"):
        gone = study.ask()
    storage.set_trial_state_values(gone._trial_id, TrialState.FAIL)
    assert budget.committed(study.get_trials(), retrying=True) == (16, 0)
    monkeypatch.setattr(baselines._budget, "RETRY_WAIT", 0.0)
    assert budget.committed(study.get_trials(), retrying=True) == (8, 0)


def test_checkpoints_kept_by_two_runs_that_ended_together_are_resolved(tmp_path):
    # Workers whose trials end at the same moment each clean up before the
    # others' trials are told, so each keeps its checkpoint. The clean-up that
    # baselines.run does after each tell sees them all and keeps only the
    # checkpoint of the trial baselines.choose picks: the best value, ties to
    # the lowest number (trials 1 and 3 tie here).
    objective = baselines.Objective(short_toy(), space=SPACE, checkpoint_dir=tmp_path)
    study = optuna.create_study(direction="maximize")
    dists = {"learning_rate": optuna.distributions.FloatDistribution(0.01, 20.0)}
    ended = [(0.5, TrialState.COMPLETE), (0.7, TrialState.COMPLETE), (None, TrialState.PRUNED)]
    ended += [(0.7, TrialState.COMPLETE), (math.inf, TrialState.COMPLETE)]
    for value, state in ended:
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": 0.1}, distributions=dists, value=value, state=state
            )
        )
    for number in range(len(ended)):
        (tmp_path / f"trial{number}.npz").write_bytes(b"x")
    # A run still to be told, worse than trial 1, drops its own checkpoint.
    objective.remove_beaten(study, (5, tmp_path / "trial5.npz", 0.6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial1.npz"]
    assert baselines.choose(study).number == 1


def test_four_workers_one_sigkilled_lose_and_duplicate_nothing(tmp_path):
    url, ckdir, budget = f"sqlite:///{tmp_path}/s.db", tmp_path / "ck", 8 * 14
    ckdir.mkdir()
    name = "toy/random/seed0"
    # Worker 0 hangs right after its first checkpoint, mid-trial, and is killed there.
    workers = [_start("baseline", url, ckdir, w, budget, int(w == 0)) for w in range(4)]
    victim = workers[0]

    def victim_has_a_checkpointed_trial():
        return any(
            t.state == TrialState.RUNNING
            and t.user_attrs.get("worker") == 0
            and t.intermediate_values
            for t in trials_of(url, name)
        )

    _wait_until(victim_has_a_checkpointed_trial, victim)
    killed = next(
        t
        for t in trials_of(url, name)
        if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == 0
    )
    _kill(victim)
    finished_before = {
        t.number: t.value for t in trials_of(url, name) if t.state == TrialState.COMPLETE
    }
    for proc in workers[1:]:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out.decode()[-3000:]
    # A worker started after the others ended fails the stale trial if nobody did, and finishes.
    time.sleep(3)
    result = baselines.run(
        short_toy(),
        "random",
        space=SPACE,
        budget_rounds=budget,
        storage=url,
        worker=9,
        checkpoint_dir=ckdir,
        heartbeat=(1, 3),
        progress=False,
    )
    trials = result.study.trials
    by_number = {t.number: t for t in trials}
    # Nothing finished before the kill was lost or changed.
    assert {n: by_number[n].value for n in finished_before} == finished_before
    # The killed trial failed and was retried exactly once, with its hyperparameters, to completion.
    assert by_number[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.number != killed.number and origin(t) == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, _table(trials)
    retry = retries[0]
    assert retry.params == killed.params
    # The retry continued from the checkpoint and ended where an uninterrupted run ends.
    hp = fathom_tune.HParams(**killed.params)
    ref = fedavg(short_toy(), hp, seed=0)
    assert retry.value == pytest.approx(ref.validation_metrics["accuracy"], abs=1e-6)
    assert fathom_tune.record.step_cost(retry).rounds == 8
    assert fathom_tune.record.step_cost(retry).examples == ref.cost.examples
    assert sorted(retry.intermediate_values) == [4, 8]
    # No run was recorded twice: one completed trial per origin.
    origins = [origin(t) for t in trials if t.state == TrialState.COMPLETE]
    assert len(origins) == len(set(origins))
    # The study finished: nothing running or waiting, and the budget holds no room for a trial.
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert budget - 8 < result.cost.rounds <= budget
    # The chosen model's checkpoint is kept and is the only one left.
    chosen = baselines.choose(result.study)
    assert [p.name for p in ckdir.iterdir() if p.suffix == ".npz"] == [f"trial{origin(chosen)}.npz"]
    assert result.params is not None
