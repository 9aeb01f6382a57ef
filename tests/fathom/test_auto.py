"""fathom-auto: its step worked by hand, its rounds against that step, its validation guard, resume."""

from __future__ import annotations

import math

import jax
import numpy as np
import optuna
import pytest
from _toy import crash_in_round, toy_task

import fathom_tune
from fathom_tune.engine import Engine
from fathom_tune.fathom.auto import AutoConfig, FathomAuto, _AutoSchedule, auto_step
from fathom_tune.hparams import NAMES

optuna.logging.set_verbosity(optuna.logging.WARNING)
LOWER, UPPER = (1e-3, 0.1, 1.0), (10.0, 10.0, 256.0)


def test_the_first_step_by_hand():
    # m = 0.1 * 0.5 = 0.05, s = 0.01 * 0.25 = 0.0025; bias-corrected 0.5 and 0.25 (sqrt 0.5):
    # log eta += 0.05 * 0.5 / (0.5 + 0.01); log E += 0.01 * (0.5 + 0.2); log B -= 0.05 * 0.2
    p, (m, s, t) = auto_step([0.0, 0.0, 3.0], (0.0, 0.0, 0), 0.5, 0.2, AutoConfig(), LOWER, UPPER)
    assert p == pytest.approx([0.025 / 0.51, 0.007, 3.0 - 0.01], abs=1e-12)
    assert (m, s, t) == pytest.approx((0.05, 0.0025, 1))


def test_a_second_step_by_hand_with_the_updates_disagreeing():
    # after H = 0.5, then H = -0.8: m = 0.9 * 0.05 + 0.1 * -0.8 = -0.035, s = 0.99 * 0.0025 + 0.01 * 0.64
    # = 0.008875; m_hat = -0.035 / 0.19, s_hat = 0.008875 / 0.0199; m_hat < 0, so G (0.3) is not counted
    p, moments = auto_step([0.0, 0.0, 3.0], (0.05, 0.0025, 1), -0.8, 0.3, AutoConfig(), LOWER, UPPER)
    m_hat, s_hat = -0.035 / 0.19, 0.008875 / 0.0199
    assert p == pytest.approx([0.05 * m_hat / (math.sqrt(s_hat) + 0.01), 0.01 * -0.8, 3.0], abs=1e-12)
    assert moments[2] == 2


def test_a_step_past_a_bound_stops_at_the_bound():
    p, _ = auto_step([math.log(10.0), 0.0, 0.0], (0.0, 0.0, 0), 1.0, 1.0, AutoConfig(rate=1.0), LOWER, UPPER)
    assert p[0] == math.log(10.0) and p[2] == math.log(1.0)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        AutoConfig(rate=0.0)
    with pytest.raises(ValueError, match="rollback must be in the open interval"):
        AutoConfig(rollback=1.5)


def test_each_round_follows_the_step_from_the_recorded_hypergradients():
    task = toy_task(num_rounds=6, eval_every=2)
    out = FathomAuto(safety_net=None, config=AutoConfig(rollback=None)).run(task)
    h = out.history
    config, p, moments = AutoConfig(), None, (0.0, 0.0, 0)
    lower = [getattr(task.bounds.lower, n) for n in NAMES]
    upper = [getattr(task.bounds.upper, n) for n in NAMES]
    for i in range(len(h) - 1):
        used = [math.log(h[n].iloc[i]) for n in NAMES]
        H, G = float(np.clip(h["H"].iloc[i], -1, 1)), float(np.clip(h["G"].iloc[i], -1, 1))
        p, moments = auto_step(used, moments, H, G, config, lower, upper)
        assert [h[n].iloc[i + 1] for n in NAMES] == pytest.approx([math.exp(x) for x in p], rel=1e-12)
    assert out.study.user_attrs["tuner"] == "fathom-auto"


def test_validation_falling_returns_to_the_best_model_with_eta_halved():
    task = toy_task(num_rounds=4)
    engine = Engine(task)
    schedule = _AutoSchedule(engine, AutoConfig(rollback=0.1))
    best = engine.init().params
    schedule.evaluated(best)
    schedule.observed(None, {task.target.metric: 0.8}, True)  # the best so far
    assert schedule.restart_model() is None
    best_p = list(schedule.p)
    schedule.p = [x + 1.0 for x in schedule.p]  # the hyperparameters moved on
    schedule.evaluated(jax.tree_util.tree_map(lambda a: a + 1.0, best))
    schedule.observed(None, {task.target.metric: 0.75}, True)  # within 10% of 0.8: kept
    assert schedule.restart_model() is None
    schedule.evaluated(jax.tree_util.tree_map(lambda a: a + 2.0, best))
    schedule.observed(None, {task.target.metric: 0.7}, True)  # below 0.72: back to the best
    back = schedule.restart_model()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(best)))
    assert schedule.p == pytest.approx([best_p[0] + math.log(0.5), *best_p[1:]])
    assert schedule.moments == (0.0, 0.0, 0)


class _Crash(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    task = toy_task(num_rounds=8, eval_every=2)
    whole = FathomAuto().run(task)
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    real = crash_in_round(monkeypatch, 5, _Crash)
    with pytest.raises(_Crash):
        FathomAuto().run(task, storage=storage, checkpoint_dir=tmp_path)
    monkeypatch.setattr(Engine, "run_round", real)
    resumed = FathomAuto().run(task, storage=storage, checkpoint_dir=tmp_path)
    columns = [c for c in whole.history.columns if c != "seconds"]
    assert resumed.history[columns].equals(whole.history[columns])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                                                     jax.tree_util.tree_leaves(whole.params)))


def test_registered_and_returns_the_shared_result():
    tuner = fathom_tune.tuners.get("fathom-auto")
    out = tuner.run(toy_task(num_rounds=2))
    assert type(out) is fathom_tune.TuningResult and out.cost.rounds == 2
