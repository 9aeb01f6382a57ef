"""FATHOM in Flower (fathom_tune.flower and examples/flower), checked end to end.

* unit checks of the client helper against hand computations;
* the example app run in this process through real Flower messages (an
  in-process grid): its hyperparameter trajectory equals
  ``fathom_tune.optimize`` on the same clients, data order and seed, its
  recorded ``G``/``H`` equal a NumPy recomputation, divergence and resume
  behave as in ``optimize``;
* the app on Flower's simulation runtime (``flwr run``, 3 SuperNodes);
* the app in a real deployment: a SuperLink and two SuperNodes on
  127.0.0.1, one SuperNode killed mid-run.

The whole module is skipped, with the reason printed, when Flower is not
installed (``pip install "fathom-tune[flower]"``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

pytest.importorskip("flwr", reason='Flower is not installed: pip install "fathom-tune[flower]"')

import optuna
from flower_helpers import processes as P
from flower_helpers.local_grid import LocalGrid
from flower_helpers.reference import replay
from flwr.app import Array, Context, RecordDict
from optuna.trial import TrialState

import fathom_tune
from fathom_tune import flower as ff
from fathom_tune import record

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "flower"
sys.path.insert(0, str(EXAMPLE))
from fathom_flower import client_app, server_app

TASK_ARGS = {"seed": 0, "num_validation_writers": 6, "num_test_writers": 5, "clients_per_writer": 1}
SMALL = {  # the app on the same task: 3 training clients, all in every round
    "validation-writers": 6,
    "test-writers": 5,
    "clients-per-writer": 1,
    "fraction-train": 1.0,
    "min-available-nodes": 3,
    "min-train-nodes": 3,
    "eval-every": 3,
}
ROUNDS = 4
NAMES = ("learning_rate", "local_epochs", "batch_size")


def app_config(**overrides) -> dict:
    """The example's run config (its pyproject.toml) with ``overrides``."""
    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    return {**config, **SMALL, **overrides}


def load_study(storage) -> optuna.Study:
    return optuna.load_study(
        study_name="digits/fathom-flower/seed0", storage=fathom_tune.open_storage(storage)
    )


def rounds_of(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials that recorded a round, by round, stale ones left out."""
    trials = [
        t
        for t in study.get_trials()
        if record.ROUND in t.user_attrs and not t.user_attrs.get(record.STALE)
    ]
    return sorted(trials, key=lambda t: t.user_attrs[record.ROUND])


def reports(directory: pathlib.Path) -> list[ff.RoundReport]:
    return [ff.RoundReport.load(p) for p in sorted(directory.glob("round*.npz"))]


def run_in_process(tmp: pathlib.Path, rounds: int, config=None, **kwargs) -> pathlib.Path:
    """The example's ServerApp and ClientApp, 3 nodes, in this process; returns the storage path.

    ``config`` overrides entries of the run config; ``kwargs`` go to :class:`LocalGrid`.
    """
    storage = tmp / "study.jsonl"
    checkpoint = kwargs.pop("checkpoint", "")
    config = app_config(
        **{
            "num-server-rounds": rounds,
            "storage": str(storage),
            "round-dir": str(tmp / "rounds"),
            "checkpoint": str(checkpoint),
            **(config or {}),
        }
    )
    grid = LocalGrid(client_app.app, config, 3, **kwargs)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config)
    server_app.app(grid=grid, context=context)
    return storage


def check_against_numpy(trials, round_reports, tol=2e-5) -> None:
    """Recorded hyperparameters, G and H equal FATHOM recomputed in NumPy from the replies."""
    task = fathom_tune.tasks.digits(**TASK_ARGS)
    cfg = fathom_tune.FathomConfig()
    expected, _ = replay(
        round_reports,
        init=[getattr(task.init_hparams, n) for n in NAMES],
        lower=[getattr(task.bounds.lower, n) for n in NAMES],
        upper=[getattr(task.bounds.upper, n) for n in NAMES],
        gamma=(cfg.gamma_learning_rate, cfg.gamma_local_epochs, cfg.gamma_batch_size),
        alpha=cfg.alpha,
    )
    assert [r.round for r in round_reports] == list(range(len(trials)))
    for trial, report, want in zip(trials, round_reports, expected, strict=True):
        for n in NAMES:
            assert trial.params[n] == pytest.approx(want["hparams"][n], rel=1e-6), (trial.number, n)
        assert trial.user_attrs[record.FATHOM_G] == pytest.approx(want["G"], abs=tol)
        assert not want["diverged"]
        assert trial.user_attrs[record.FATHOM_H] == pytest.approx(want["H"], abs=tol)
        flat_u = np.concatenate([np.ravel(report.update[k]) for k in sorted(report.update)])
        np.testing.assert_allclose(flat_u, want["u"], rtol=1e-4, atol=1e-7)


def check_against_optimize(trials, history) -> None:
    """The same hyperparameter trajectory (float32 tolerance) and hypergradients."""
    assert len(trials) == len(history)
    for trial, (_, row) in zip(trials, history.iterrows(), strict=True):
        for n in NAMES:
            assert trial.params[n] == pytest.approx(row[n], rel=1e-5), (trial.number, n)
        assert trial.user_attrs[record.FATHOM_G] == pytest.approx(row["G"], abs=1e-5)
        assert trial.user_attrs[record.FATHOM_H] == pytest.approx(row["H"], abs=1e-5)
        assert trial.value == pytest.approx(row["train_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def optimized():
    """``fathom_tune.optimize`` on the task the app runs: the reference trajectory."""
    task = fathom_tune.tasks.digits(**TASK_ARGS)
    assert task.clients_per_round == task.train.num_clients() == 3
    return fathom_tune.optimize(task, seed=0, num_rounds=ROUNDS, eval_every=3).history


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("in_process")
    return tmp, run_in_process(tmp, ROUNDS)


# ------------------------------------------------------------------ client side
def test_batch_plan_shuffles_and_repeats_to_whole_batches():
    hp = fathom_tune.HParams(learning_rate=0.1, local_epochs=2.5, batch_size=3.5)  # B_int = 4
    plan = ff.batch_plan(7, hp, np.random.default_rng(3))
    assert plan.shape == (math.ceil(2.5 * 7 / 4), 4)  # K = 5 steps of exactly 4 examples
    flat = plan.ravel()
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(flat, np.concatenate([rng.permutation(7) for _ in range(3)])[:20])


def test_local_sgd_phi_and_steps_match_a_hand_computation():
    # loss(x) = mean_j 0.5 |x - a_j|^2: gradient x - mean(a_batch), computed here by hand.
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0], [2.0, -2.0]], np.float32)

    def grad_fn(params, batch, key):
        diff = params["x"] - batch["a"]
        return 0.5 * np.mean(np.sum(diff**2, axis=1)), {"x": np.mean(diff, axis=0)}

    hp = fathom_tune.HParams(learning_rate=0.3, local_epochs=1.2, batch_size=2.0)
    x0 = {"x": np.array([0.5, 0.5], np.float32)}
    result = ff.LocalSGD(grad_fn)(x0, {"a": a}, hp, rng=np.random.default_rng(7))
    plan = ff.batch_plan(5, hp, np.random.default_rng(7))
    x, cosines, losses = x0["x"].astype(np.float64), [], []
    for rows in plan:
        g = x - a[rows].mean(axis=0)
        losses.append(0.5 * np.mean(np.sum((x - a[rows]) ** 2, axis=1)))
        x = x - 0.3 * g
        d = x0["x"] - x
        cosines.append(g @ d / (np.linalg.norm(g) * np.linalg.norm(d)))
    assert result.local_steps == 3 == math.ceil(1.2 * 5 / 2) and result.batch_size == 2
    np.testing.assert_allclose(result.params["x"], x, rtol=1e-6)
    assert result.phi == pytest.approx(min(cosines), abs=1e-6) and result.phi < 1.0
    assert result.train_loss == pytest.approx(np.mean(losses), rel=1e-6)
    assert result.metrics() == {
        "num-examples": 5,
        "phi": result.phi,
        "train-loss": result.train_loss,
        "local-steps": 3,
    }


def test_client_config_and_arrays_are_checked():
    with pytest.raises(ValueError, match=r"lacks \['batch-size', 'fathom-round'\]"):
        ff.read_train_config({"learning-rate": 0.1, "local-epochs": 1.0})
    with pytest.raises(
        ValueError, match=r"config\['learning-rate'\] must be a finite number > 0, got -1"
    ):
        ff.read_train_config(
            {"learning-rate": -1.0, "local-epochs": 1.0, "batch-size": 2.0, "fathom-round": 0}
        )
    like = {"w": np.zeros((2, 3), np.float32)}
    with pytest.raises(
        ValueError, match=r"array 'w' is float32\[3, 2\]; the model needs float32\[2, 3\]"
    ):
        ff.from_array_record(ff.to_array_record({"w": np.zeros((3, 2), np.float32)}), like)
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        ff.from_array_record({"v": np.zeros((2, 3), np.float32)}, like)


def test_strategy_arguments_are_checked():
    task = fathom_tune.tasks.digits(**TASK_ARGS)
    with pytest.raises(ValueError, match=r"fraction_train must be in \(0, 1\], got 0.0"):
        ff.FathomFedAvg.for_task(task, fraction_train=0.0)
    with pytest.raises(ValueError, match="checkpoint needs a persistent storage"):
        ff.FathomFedAvg.for_task(task, checkpoint="/tmp/x.npz")


# ------------------------------------------------------- the app, in this process
def test_in_process_run_equals_optimize_and_numpy(in_process, optimized):
    tmp, storage = in_process
    study = load_study(storage)
    trials = rounds_of(study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * ROUNDS
    check_against_numpy(trials, reports(tmp / "rounds"))
    check_against_optimize(trials, optimized)
    run = record.read_run(study)
    assert (run.tuner, run.unit, run.ledger.rounds) == ("fathom-flower", "round", ROUNDS)
    assert list(run.evaluations["rounds"]) == [3, 4]  # every 3 rounds and after the last
    steps = sum(t.user_attrs[record.LOCAL_STEPS] for t in trials)
    assert run.ledger.steps == steps == int(optimized["local_steps"].sum())
    assert run.test and run.validation["accuracy"] == pytest.approx(
        optimized["val_accuracy"].iloc[-1], abs=1e-5
    )


def test_divergent_round_is_discarded_and_halves_the_learning_rate(tmp_path):
    def poison(msg, reply):  # round 1: node 1001 returns a non-finite model
        config = msg.content["config"]
        if config["fathom-round"] == 1 and msg.metadata.dst_node_id == 1001:
            arrays = reply.content["arrays"]
            name = min(arrays)
            arrays[name] = Array(np.full_like(arrays[name].numpy(), np.nan))
        return reply

    storage = run_in_process(tmp_path, 3, after_reply=poison)
    trials = rounds_of(load_study(storage))
    got = reports(tmp_path / "rounds")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs[record.FATHOM_DIVERGED] is True and got[1].diverged
    assert trials[2].params["learning_rate"] == pytest.approx(
        0.5 * trials[1].params["learning_rate"]
    )
    for n in ("local_epochs", "batch_size"):
        assert trials[2].params[n] == trials[1].params[n]
    for name in got[0].x0:  # the diverged round's model was discarded
        np.testing.assert_array_equal(got[2].x0[name], got[1].x0[name])
    # m unchanged: H of round 2 is the cosine with m = (1 - alpha) u_0
    u0 = np.concatenate([np.ravel(got[0].update[k]) for k in sorted(got[0].update)])
    u2 = np.concatenate([np.ravel(got[2].update[k]) for k in sorted(got[2].update)])
    want = u0 @ u2 / (np.linalg.norm(u0) * np.linalg.norm(u2))
    assert trials[2].user_attrs[record.FATHOM_H] == pytest.approx(want, abs=1e-5)


def test_resume_after_a_crash_continues_the_same_run(tmp_path, in_process):
    class Crash(RuntimeError):
        pass

    def crash_in_round_3(messages):
        if messages and messages[0].content["config"]["fathom-round"] == 3:
            raise Crash("the server died while round 3 was out")

    checkpoint = tmp_path / "fathom.npz"
    with pytest.raises(Crash):
        run_in_process(tmp_path, ROUNDS, checkpoint=checkpoint, before_send=crash_in_round_3)
    stale = [
        t for t in load_study(tmp_path / "study.jsonl").trials if t.state == TrialState.RUNNING
    ]
    assert len(stale) == 1  # round 3 was asked, never told
    run_in_process(tmp_path, ROUNDS, checkpoint=checkpoint)
    study = load_study(tmp_path / "study.jsonl")
    assert study.trials[stale[0].number].state == TrialState.FAIL
    assert study.trials[stale[0].number].user_attrs[record.STALE] is True
    resumed, uninterrupted = rounds_of(study), rounds_of(load_study(in_process[1]))
    assert [t.state for t in resumed] == [TrialState.COMPLETE] * ROUNDS
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a.params == b.params and a.value == pytest.approx(b.value, rel=1e-6)
        assert a.user_attrs[record.FATHOM_H] == pytest.approx(
            b.user_attrs[record.FATHOM_H], abs=1e-6
        )


def test_too_few_nodes_stop_the_run_with_a_clear_error_and_keep_its_rounds(tmp_path):
    storage = tmp_path / "study.jsonl"
    config = app_config(**{"num-server-rounds": 3, "storage": str(storage), "node-wait": 0.0})
    grid = LocalGrid(client_app.app, config, 3)

    def leave_after_round_0(msg, reply):  # node 1002 replies to round 0, then disconnects
        if msg.metadata.dst_node_id == 1002:
            grid.contexts.pop(1002)
        return reply

    grid.after_reply = leave_after_round_0
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RuntimeError) as info:
        server_app.app(grid=grid, context=context)
    assert "round 1: 2 node(s) connected after waiting 0.0 s; this round needs 3" in str(info.value)
    assert "keeps the 1 round(s) finished so far" in str(info.value)
    trials = load_study(storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE]  # round 0 kept, none left running


# ------------------------------------------------- Flower's runtimes, as processes
def test_simulation_runtime(tmp_path, optimized):
    prefix = P.netns_prefix()
    if prefix is None:
        pytest.skip(
            "Flower's simulation runtime is Ray, whose servers listen on all network interfaces; "
            "this test runs it only in a private network namespace (unshare --net), which this "
            "system refuses"
        )
    config = app_config(
        **{
            "num-server-rounds": ROUNDS,
            "storage": str(tmp_path / "study.jsonl"),
            "round-dir": str(tmp_path / "rounds"),
        }
    )
    federation = {"num-supernodes": 3, "client-resources-num-cpus": 1, "init-args-num-cpus": 2}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    args = [
        *prefix,
        sys.executable,
        "-m",
        "flower_helpers.simulate",
        str(EXAMPLE),
        str(tmp_path / "home"),
        json.dumps(config),
        json.dumps(federation),
        "240",
    ]
    done = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == "finished:completed", out["logs"][-3000:]
    trials = rounds_of(load_study(tmp_path / "study.jsonl"))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * ROUNDS
    check_against_numpy(trials, reports(tmp_path / "rounds"))
    check_against_optimize(trials, optimized)


def test_deployment_survives_losing_a_supernode(tmp_path):
    rounds = 2
    home, storage = tmp_path / "home", tmp_path / "study.jsonl"
    env = P.flower_env(home)
    link_port = P.free_port()
    P.write_connection(home, "local", link_port)
    procs = []
    try:
        link = P.superlink(link_port, env, tmp_path / "superlink.log", simulation=False)
        procs.append(link)
        P.wait_for_port(link_port, link, 60, tmp_path / "superlink.log")
        ports = [P.free_port() for _ in range(2)]
        for p, port in enumerate(ports):
            procs.append(
                P.supernode(
                    link_port,
                    port,
                    p,
                    2,
                    P.flower_env(tmp_path / f"node{p}"),
                    tmp_path / f"supernode{p}.log",
                )
            )
        for p, port in enumerate(ports):
            P.wait_for_port(port, procs[1 + p], 60, tmp_path / f"supernode{p}.log")
        config = app_config(
            **{
                "num-server-rounds": rounds,
                "storage": str(storage),
                "min-available-nodes": 1,
                "min-train-nodes": 1,
                "round-timeout": 45.0,  # the dead node is missed for at most 45 s
                "node-wait": 30.0,
            }
        )
        run_id = P.submit(EXAMPLE, "local", config, env)
        deadline = time.monotonic() + 180
        while not (
            storage.exists()
            and any(t.state == TrialState.COMPLETE for t in load_study(storage).trials)
        ):
            assert time.monotonic() < deadline, P.run_logs("local", run_id, env)[-3000:]
            time.sleep(1)
        os.killpg(procs[2].pid, signal.SIGKILL)  # SuperNode 1 (and its ClientApp) dies mid-run
        status = P.wait_for_run("local", run_id, env, timeout=240, storage=storage)
        logs = "" if status == "finished:completed" else P.run_logs("local", run_id, env)
    finally:
        for proc in reversed(procs):
            P.stop(proc)
    study = load_study(storage)
    trials = rounds_of(study)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert [t.user_attrs[record.ROUND] for t in trials] == list(range(len(trials)))
    for t in trials:
        assert -1 <= t.user_attrs[record.FATHOM_G] <= 1 and -1 <= t.user_attrs[record.FATHOM_H] <= 1
    if status == "finished:completed":  # the last round trained on the surviving node alone
        sent = [t.user_attrs["cost"]["bytes_up"] for t in trials]
        assert len(trials) == rounds and sent[-1] * 2 == sent[0], (sent, f"logs in {tmp_path}")
    else:  # stopped: the reason is FATHOM's clear error about the missing nodes
        assert status == "finished:failed", status
        assert "node(s) connected after waiting" in logs, logs[-3000:]
