import math

import numpy as np
import optuna
import pytest
from _toy import flat, toy_task

import fathom_tune
from fathom_tune import Bounds, FathomConfig, HParams
from fathom_tune.engine import Engine
from fathom_tune.loop import Static, run

optuna.logging.set_verbosity(optuna.logging.WARNING)



def test_zero_hyper_learning_rates_equal_static_fedavg():
    task = toy_task()
    frozen = FathomConfig(gamma_local_epochs=0.0, gamma_learning_rate=0.0, gamma_batch_size=0.0)
    res = fathom_tune.optimize(task, config=frozen, seed=4, num_rounds=6, progress=False)
    ref = run(Engine(task, seed=4), Static(task.init_hparams), num_rounds=6)
    assert np.array_equal(flat(res.params), flat(ref.params))
    assert list(res.history["train_loss"]) == list(ref.history["train_loss"])
    for name, value in task.init_hparams.as_dict().items():
        assert getattr(res.hparams, name) == pytest.approx(value, rel=1e-12)


def test_hyperparameters_follow_the_egn_recursion_from_h_and_g():
    task = toy_task()
    cfg = FathomConfig(gamma_local_epochs=0.2, gamma_learning_rate=0.3, gamma_batch_size=0.5)
    res = fathom_tune.optimize(task, config=cfg, num_rounds=6, progress=False)
    h = res.history
    lo, hi = task.bounds.lower, task.bounds.upper
    # Independent recomputation: p = log(E, eta, B); E += gE (H+G); eta += geta H; B -= gB G.
    for t in range(len(h) - 1):
        H, G = h["H"][t], h["G"][t]
        E = math.exp(math.log(h["local_epochs"][t]) + 0.2 * (H + G))
        eta = math.exp(math.log(h["learning_rate"][t]) + 0.3 * H)
        B = math.exp(math.log(h["batch_size"][t]) - 0.5 * G)
        assert h["local_epochs"][t + 1] == pytest.approx(min(max(E, lo.local_epochs), hi.local_epochs), rel=1e-9)
        assert h["learning_rate"][t + 1] == pytest.approx(min(max(eta, lo.learning_rate), hi.learning_rate), rel=1e-9)
        assert h["batch_size"][t + 1] == pytest.approx(min(max(B, lo.batch_size), hi.batch_size), rel=1e-9)
    assert h["H"][0] == 0.0  # m = 0 in round 1
    assert h["H"].iloc[1:].abs().max() > 0  # H is computed afterwards
    assert ((h["G"] >= -1) & (h["G"] <= 1)).all()


def test_study_records_one_trial_per_round_with_conventions(tmp_path):
    task = toy_task()
    url = f"sqlite:///{tmp_path / 'fathom.db'}"
    res = fathom_tune.optimize(task, num_rounds=4, eval_every=2, storage=url, seed=2, progress=False)
    study = optuna.load_study(study_name="toy/fathom/seed2", storage=url)
    trials = study.trials
    assert len(trials) == 4
    assert study.user_attrs["tuner"] == "fathom" and study.user_attrs["seed"] == 2
    assert study.user_attrs["task"] == "toy" and study.user_attrs["budget_rounds"] == 4
    for t, row in zip(trials, res.history.itertuples()):
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.params["learning_rate"] == row.learning_rate
        assert t.params["batch_size"] == row.batch_size
        assert t.value == pytest.approx(row.train_loss)
        assert t.user_attrs["fathom.H"] == pytest.approx(row.H)
        assert t.user_attrs["fathom.G"] == pytest.approx(row.G)
        assert t.user_attrs["local_steps"] == row.local_steps
    assert trials[0].user_attrs["evals"] == []
    assert trials[1].user_attrs["evals"][0]["val_accuracy"] == pytest.approx(res.history["val_accuracy"][1])
    assert study.user_attrs["test"]["accuracy"] == pytest.approx(res.test_metrics["accuracy"])
    # optimize alone records the whole run: its ledger, what it returns, and one record shape
    run_ = fathom_tune.record.read_run(study)
    assert run_.ledger == res.cost and run_.unit == "round" and run_.tuner == "fathom"
    assert run_.hparams == res.hparams and run_.test == res.test_metrics
    assert list(run_.evaluations["rounds"]) == [2, 4]
    assert list(run_.evaluations["examples"]) == list(res.history["examples"].iloc[[1, 3]])
    # Optuna's own plots work on the study.
    pytest.importorskip("plotly")
    fig = optuna.visualization.plot_optimization_history(study)
    assert len(fig.data[0].x) == 4
    # A second run into the same study name is refused; nothing is added.
    with pytest.raises(ValueError, match="already holds 4 rounds"):
        fathom_tune.optimize(task, num_rounds=2, storage=url, seed=2, progress=False)
    assert len(optuna.load_study(study_name="toy/fathom/seed2", storage=url).trials) == 4


def test_divergent_round_is_discarded_and_the_learning_rate_halved():
    task = toy_task(bounds=Bounds(HParams(1e-4, 0.01, 1.0), HParams(1e38, 10.0, 256.0)))
    cfg = FathomConfig(init=HParams(1e38, 3.0, 5.0))
    res = fathom_tune.optimize(task, config=cfg, num_rounds=3, progress=False)
    h = res.history
    assert h["diverged"].iloc[0] and not h["accepted"].iloc[0]
    assert h["learning_rate"].iloc[1] == pytest.approx(0.5e38)
    first = res.study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["fathom.diverged"] is True
    # Every round diverged: the model is still the initial one, and finite.
    if not h["accepted"].any():
        assert np.array_equal(flat(res.params), flat(Engine(task).init().params))
    assert np.isfinite(flat(res.params)).all()
    assert res.cost.rounds == 3  # discarded rounds still cost a round


@pytest.fixture(scope="module")
def digits():
    return fathom_tune.tasks.digits()


@pytest.mark.parametrize("lr", [1e-4, 1e-2, 1.0, 10.0])
def test_learning_rate_sweep_on_digits_ends_finite(digits, lr):
    task = digits
    res = fathom_tune.optimize(task, config=FathomConfig(init=HParams(lr, 1.0, 20.0)), num_rounds=4, progress=False)
    assert np.isfinite(flat(res.params)).all()
    assert math.isfinite(res.validation_metrics["loss"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"config": "fast"}, TypeError, "config"),
        ({"config": FathomConfig(init=HParams(100.0, 1.0, 10.0))}, ValueError, "config.init.learning_rate"),
        ({"config": FathomConfig(alpha=0.2, gamma_batch_size=0.0)}, None, None),
        ({"storage": "nosuchscheme://x"}, ValueError, "storage"),
        ({"storage": 42}, TypeError, "storage"),
        ({"study_name": ""}, ValueError, "study_name"),
        ({"num_rounds": 0}, ValueError, "num_rounds"),
    ],
)
def test_optimize_rejects_bad_arguments(kwargs, error, match):
    task = toy_task()
    if error is None:
        assert fathom_tune.optimize(task, num_rounds=1, progress=False, **kwargs).cost.rounds == 1
        return
    with pytest.raises(error, match=match):
        fathom_tune.optimize(task, **{"num_rounds": 2, "progress": False, **kwargs})


def test_bad_storage_writes_nothing(tmp_path):
    missing_dir = tmp_path / "no" / "such" / "dir" / "journal.log"
    with pytest.raises(ValueError, match="does not exist"):
        fathom_tune.optimize(toy_task(), num_rounds=1, storage=str(missing_dir), progress=False)
    assert not (tmp_path / "no").exists()


def test_task_rejects_bad_defaults():
    with pytest.raises(ValueError, match="clients_per_round"):
        toy_task(clients_per_round=99)
    with pytest.raises(ValueError, match="0 examples"):
        toy_task(sizes=(10, 0, 5), clients_per_round=1)
    with pytest.raises(ValueError, match="init_hparams"):
        toy_task(init_hparams=HParams(100.0, 1.0, 10.0))


@pytest.mark.parametrize(
    "local_epochs, batch_size, sizes",
    [
        (0.1, 10.0, (10, 20, 30, 40, 50)),
        (1.0, 10.0, (10, 20, 30, 40, 50)),
        (3.0, 10.0, (10, 20, 30, 40, 50)),  # E n / B integer for every client: 3 -> 3.0000000000000004 gained a step
        (7.0, 5.0, (15, 25, 35, 45, 55)),
        (10.0, 10.0, (10, 20, 30, 40, 50)),  # on the upper bound
        (0.01, 1.0, (100, 100, 100, 100, 100)),  # on the lower bound, n / B = 100: one step, not two
    ],
)
def test_frozen_hyperparameters_stay_bit_identical_and_equal_static_fedavg(local_epochs, batch_size, sizes):
    task = toy_task(sizes=sizes, clients_per_round=3)
    start = HParams(learning_rate=0.1, local_epochs=local_epochs, batch_size=batch_size)
    frozen = FathomConfig(init=start, gamma_local_epochs=0.0, gamma_learning_rate=0.0, gamma_batch_size=0.0)
    res = fathom_tune.optimize(task, config=frozen, seed=1, num_rounds=3)
    ref = fathom_tune.fedavg(task, start, seed=1, num_rounds=3)
    assert res.hparams == start  # exactly, not up to rounding
    assert list(res.history["local_epochs"]) == [local_epochs] * 3
    assert list(res.history["local_steps"]) == list(ref.history["local_steps"])
    n = np.array(sizes, dtype=float)
    expected_steps = np.maximum(np.ceil(local_epochs * n / round(batch_size)), 1)  # per client, by hand
    assert set(res.history["local_steps"]) <= {int(expected_steps[list(c)].sum()) for c in _triples(len(sizes))}
    assert np.array_equal(flat(res.params), flat(ref.params))


def _triples(n):
    import itertools

    return itertools.combinations(range(n), 3)
