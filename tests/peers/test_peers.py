"""FATHOM's one-run peers: FedEx, FedHyper and fathom+server, and the engine features they use."""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from _toy import crash_in_round, flat, toy_task
from optuna.trial import TrialState

import fathom_tune
from fathom_tune import Bounds, ClientHParams, HParams, record, tuners
from fathom_tune.engine import Engine, batch_indices, client_rng
from fathom_tune.peers import (
    ClientRate,
    FedEx,
    FedHyper,
    arm_gradient,
    exponentiated_step,
    fedex_candidates,
    fedhyper_server,
    keep_update,
)
from fathom_tune.peers.fedex import _FedExSchedule
from fathom_tune.peers.fedhyper import _FedHyperSchedule
from fathom_tune.tuning import driver as _one_run
from fathom_tune.tuning import one_run as peer_run

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ the engine
def _mean_loss(model, params, batch):
    return jnp.mean(model.train_loss(batch, model.apply_for_train(params, batch, None)))


def _eval_loss(model, params, batch):
    return float(np.mean(np.asarray(model.train_loss(batch, model.apply_for_eval(params, batch)))))


@pytest.mark.parametrize("validation", [0.0, 0.2])
def test_each_clients_settings_reach_its_model(validation):
    # Three clients, each with its own (eta, E, B): the round's update must be the
    # example-weighted mean of hand-run SGD, K_i = max(ceil(E n_i / B), 1) steps of
    # exactly B examples at rate eta, on the client's own training part.
    task = toy_task(clients_per_round=3)
    engine = Engine(task, seed=4, client_validation=validation)
    state = engine.init()
    own = (HParams(0.3, 1.0, 7.0), HParams(0.05, 2.5, 4.0), HParams(0.1, 0.01, 16.0))
    new_state, res = engine.run_round(state, ClientHParams(clients=own, summary=own[0]))

    model, x0 = task.model, state.params
    ids = list(task.train.client_ids())
    deltas, sizes, steps, befores, afters, held = [], [], [], [], [], []
    for hp, c in zip(own, engine.sampled(0)):
        examples = {k: np.asarray(v) for k, v in task.train.get_client(ids[c]).all_examples().items()}
        train, val = engine.client_split(int(c))
        assert len(train) + len(val) == len(examples["y"])
        assert len(val) == (math.ceil(validation * len(examples["y"])) if validation else 0)
        part = {k: v[train] for k, v in examples.items()}
        n = len(train)
        k_steps = max(math.ceil(hp.local_epochs * n / hp.batch_int), 1)
        plan = batch_indices(n, k_steps, hp.batch_int, client_rng(4, 0, int(c)))
        assert plan.shape == (k_steps, hp.batch_int)
        p = x0
        for rows in plan:
            g = jax.grad(_mean_loss, argnums=1)(model, p, {k: v[rows] for k, v in part.items()})
            p = jax.tree_util.tree_map(lambda a, b, eta=hp.learning_rate: a - eta * b, p, g)
        deltas.append(flat(x0) - flat(p))
        sizes.append(n)
        steps.append(k_steps)
        if validation:
            vpart = {k: v[val] for k, v in examples.items()}
            befores.append(_eval_loss(model, x0, vpart))
            afters.append(_eval_loss(model, p, vpart))
            held.append(len(val))
    w = np.array(sizes) / sum(sizes)
    u = np.tensordot(w, np.array(deltas), axes=1)
    assert res.local_steps.tolist() == steps
    assert res.client_hparams == own and res.hparams == own[0]
    np.testing.assert_allclose(flat(res.update), u, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(flat(new_state.params), flat(x0) - u, rtol=2e-4, atol=1e-6)
    trained = sum(k * hp.batch_int for k, hp in zip(steps, own))
    assert res.cost.steps == sum(steps)
    if validation:
        np.testing.assert_allclose(res.validation_before, befores, rtol=1e-5)
        np.testing.assert_allclose(res.validation_after, afters, rtol=1e-4)
        assert res.validation_size.tolist() == held
        assert res.cost.examples == trained + 2 * sum(held)  # both validation passes are counted
    else:
        assert res.validation_before is None and res.cost.examples == trained


def test_a_round_of_equal_client_settings_is_the_static_round():
    task = toy_task()
    engine = Engine(task, seed=1)
    hp = HParams(0.2, 1.5, 6.0)
    _, static = engine.run_round(engine.init(), hp)
    _, same = engine.run_round(engine.init(), ClientHParams(clients=(hp,) * 4, summary=hp))
    assert np.array_equal(flat(static.update), flat(same.update))
    assert dataclasses.replace(static.cost, seconds=0.0) == dataclasses.replace(same.cost, seconds=0.0)
    assert static.validation_before is None and engine.settings.client_validation == 0.0


def test_per_client_rounds_compile_one_program_per_bucket():
    task = toy_task()
    engine = Engine(task, seed=0, client_validation=0.2)
    state = engine.init()
    before = engine.compile_counts.get("local_steps", 0)
    rng = np.random.default_rng(0)
    batches = (4.0, 6.0, 8.0)  # buckets 4, 6, 8
    for _ in range(6):
        own = tuple(HParams(float(rng.choice([0.01, 0.1])), float(rng.choice([0.5, 2.0])), float(rng.choice(batches)))
                    for _ in range(4))
        state, _ = engine.run_round(state, ClientHParams(clients=own, summary=own[0]))
    assert engine.compile_counts["local_steps"] - before <= len(batches)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: Engine(toy_task(), client_validation=0.7), ValueError, "client_validation"),
        (lambda: Engine(toy_task(), client_validation="0.2"), TypeError, "client_validation"),
        (lambda: ClientHParams(clients=(), summary=HParams(0.1, 1.0, 4.0)), TypeError, "clients"),
        (lambda: FedEx(schedule="fast"), ValueError, "aggressive"),
        (lambda: FedEx(discount=1.5), ValueError, "discount"),
        (lambda: FedEx(validation=0.0), ValueError, "validation"),
        (lambda: FedEx(batch_size_factors=(0.0,)), ValueError, "batch_size_factors"),
        (lambda: FedHyper("x", "cl+gm"), ValueError, "'g', 'gm', 'sl', 'cl', 'full'"),
        (lambda: fedhyper_server(momentum=1.0), ValueError, "momentum"),
    ],
)
def test_bad_arguments_are_refused_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_round_needs_one_setting_per_sampled_client():
    engine = Engine(toy_task(clients_per_round=3))
    hp = HParams(0.1, 1.0, 4.0)
    with pytest.raises(ValueError, match="3 clients per round"):
        engine.run_round(engine.init(), ClientHParams(clients=(hp, hp), summary=hp))


# ------------------------------------------------------------------- FedEx math
def test_fedex_gradient_and_renormalised_step_by_hand():
    # Three clients (weights 10, 20, 30), three arms with theta = (0.5, 0.3, 0.2);
    # clients drew arms 0, 2, 0 and scored 1.2, 0.7, 0.9 against a baseline of 0.8.
    theta = np.array([0.5, 0.3, 0.2])
    omega = np.array([10.0, 20.0, 30.0]) / 60.0
    scores, arms, baseline = np.array([1.2, 0.7, 0.9]), [0, 2, 0], 0.8
    g = arm_gradient(arms, theta, omega, scores, baseline)
    # By hand: arm 0 gets (1/6)(0.4) + (1/2)(0.1) = 0.116667, / 0.5; arm 2 gets (1/3)(-0.1), / 0.2.
    np.testing.assert_allclose(g, [0.2333333, 0.0, -0.1666667], rtol=1e-6)

    z = exponentiated_step(np.log(theta), g, t=4, schedule="aggressive")
    step = math.sqrt(2 * math.log(3)) / 0.2333333333  # eta0 / ||g||_inf
    expected = np.log(theta) - step * g
    expected = expected - math.log(np.exp(expected).sum())
    np.testing.assert_allclose(z, expected, rtol=1e-9)
    np.testing.assert_allclose(np.exp(z), [0.1146887, 0.3029899, 0.5823215], rtol=1e-6)
    assert math.isclose(float(np.exp(z).sum()), 1.0, rel_tol=1e-12)

    z_auto = exponentiated_step(np.log(theta), g, t=4, schedule="auto")  # D = sqrt(4)
    np.testing.assert_allclose(np.exp(z_auto), [0.4441859, 0.3168261, 0.2389880], rtol=1e-6)
    # No signal: the aggressive step divides by 1, the distribution stays.
    np.testing.assert_allclose(exponentiated_step(np.log(theta), np.zeros(3), t=1), np.log(theta), atol=1e-12)


def _fake_round(schedule, clients, before, after, size):
    return types.SimpleNamespace(
        client_hparams=clients,
        validation_before=np.array(before),
        validation_after=np.array(after),
        validation_size=np.array(size),
    )


def test_fedex_schedule_uses_the_previous_rounds_as_baseline():
    task = toy_task(clients_per_round=2)
    fedex = FedEx(learning_rate_factors=(0.1, 1.0), local_epochs_factors=(1.0,), batch_size_factors=(1.0,))
    sched = _FedExSchedule(Engine(task, seed=0), fedex)
    assert sched.candidates["learning_rate"] == (0.01, 0.1)
    first = sched.propose(0)
    arms0 = sched.arms[:, 0].copy()
    sched.learn(_fake_round(sched, first.clients, [2.0, 2.0], [1.0, 3.0], [1, 3]), True)
    # Round 1: baseline 0; omega = (1/4, 3/4); uniform theta over two arms.
    omega = np.array([0.25, 0.75])
    g = np.zeros(2)
    for j in range(2):
        g[arms0[j]] += omega[j] * ([1.0, 3.0][j] - 0.0) / 0.5
    z = np.log([0.5, 0.5]) - math.sqrt(2 * math.log(2)) / np.abs(g).max() * g
    z -= math.log(np.exp(z).sum())
    np.testing.assert_allclose(sched.z["learning_rate"], z, rtol=1e-9)
    r1 = 0.25 * 1.0 + 0.75 * 3.0
    second = sched.propose(1)
    arms1 = sched.arms[:, 0].copy()
    attrs = sched.learn(_fake_round(sched, second.clients, [1.0, 1.0], [0.5, 2.0], [2, 2]), True)
    assert attrs[record.FEDEX_BASELINE] == pytest.approx(r1)  # discount 0: the last round's R
    theta = np.exp(z)
    g = np.zeros(2)
    for j in range(2):
        g[arms1[j]] += 0.5 * ([0.5, 2.0][j] - r1) / theta[arms1[j]]
    z = z - math.sqrt(2 * math.log(2)) / np.abs(g).max() * g
    z -= math.log(np.exp(z).sum())
    np.testing.assert_allclose(sched.z["learning_rate"], z, rtol=1e-9)
    assert attrs[record.FEDEX_THETA]["learning_rate"] == pytest.approx(np.exp(z).tolist())
    assert sched.returned().learning_rate == (0.01, 0.1)[int(np.argmax(z))]


def test_fedex_arms_lie_within_the_bounds():
    task = toy_task(bounds=Bounds(HParams(0.05, 0.5, 2.0), HParams(0.5, 2.0, 12.0)))
    cands = fedex_candidates(task, FedEx().factors())
    assert cands == {
        "learning_rate": (0.05, 0.1, 0.316227766017, 0.5),
        "local_epochs": (0.5, 1.0, 2.0),
        "batch_size": (5.0, 10.0, 12.0),
    }


# ---------------------------------------------------------------- FedHyper math
def test_fedhyper_g_and_gm_server_steps_by_hand():
    deltas = [np.array(d) for d in ([1.0, 0.0], [0.5, 0.5], [3.0, 1.0], [2.0, 0.0], [-3.0, 0.0])]

    def reference(momentum, lo, hi):  # the paper's rule, written out in NumPy
        a, prev, out = 0.0, np.zeros(2), []
        for d in deltas:
            a = min(max(a + prev @ d, lo), hi)
            if momentum is None:
                out.append(((1 + a) * d, a))
                prev = d
            else:
                out.append(((1 + a) * d + momentum * a * prev, a))
                prev = d + momentum * prev
        return out

    for momentum, lo, hi in ((None, -0.8, 4.0), (0.9, -0.2, 4.0)):
        rule = fedhyper_server(momentum=momentum)
        state = rule.init({"w": jnp.zeros(2)})
        got = []
        for d in deltas:  # the engine passes the gradient-signed update u = -Delta
            step, state = rule.update({"w": jnp.asarray(-d, jnp.float32)}, state)
            got.append((np.asarray(step["w"]), float(state.a)))
        for (s, a), (ws, wa) in zip(got, reference(momentum, lo, hi)):
            np.testing.assert_allclose(s, ws, rtol=1e-6, atol=1e-7)
            assert a == pytest.approx(wa)
    # By hand, G: a = 0, 0.5, 2.5, then 4 (clipped from 8.5), then -0.8 (clipped from -2).
    g = fedhyper_server(momentum=None)
    state = g.init({"w": jnp.zeros(2)})
    a_seq = []
    for d in deltas:
        step, state = g.update({"w": jnp.asarray(-d)}, state)
        a_seq.append(float(state.a))
    assert a_seq == pytest.approx([0.0, 0.5, 2.5, 4.0, -0.8])
    np.testing.assert_allclose(np.asarray(step["w"]), [-0.6, 0.0], atol=1e-6)
    # By hand, GM round 1: a = 0.5, step = 1.5 (0.5, 0.5) + 0.9 * 0.5 * (1, 0) = (1.2, 0.75);
    # round 2: a = clip(0.5 + <(1.4, 0.5), (-1, 0)>) = -0.2.
    gm = fedhyper_server()
    state = gm.init({"w": jnp.zeros(2)})
    _, state = gm.update({"w": jnp.array([-1.0, 0.0])}, state)
    step, state = gm.update({"w": jnp.array([-0.5, -0.5])}, state)
    np.testing.assert_allclose(np.asarray(step["w"]), [1.2, 0.75], rtol=1e-6)
    step, state = gm.update({"w": jnp.array([1.0, 0.0])}, state)
    assert float(state.a) == pytest.approx(-0.2)
    np.testing.assert_allclose(np.asarray(step["w"]), [-0.8 - 0.9 * 0.2 * 1.4, -0.9 * 0.2 * 0.5], rtol=1e-6)


def test_fedhyper_sl_rate_carries_over_rounds_within_the_bounds():
    task = toy_task()
    engine = Engine(task, seed=0)
    sched = _FedHyperSchedule(engine, "sl")
    leaves, treedef = jax.tree_util.tree_flatten(engine.init().params)

    def update(value):
        return jax.tree_util.tree_unflatten(treedef, [np.full(x.shape, value, np.float32) for x in leaves])

    size = flat(update(1.0)).size
    assert sched.propose(0).learning_rate == pytest.approx(0.1)
    sched.learn(types.SimpleNamespace(update=update(-0.01)), True)  # Delta_0 = 0.01 everywhere
    assert sched.propose(1).learning_rate == pytest.approx(0.1)  # a_0 = <0, Delta_0> = 0
    sched.learn(types.SimpleNamespace(update=update(-0.02)), True)
    a1 = 0.01 * 0.02 * size
    assert sched.propose(2).learning_rate == pytest.approx(0.1 * (1 + a1), rel=1e-5)
    sched.learn(types.SimpleNamespace(update=update(-0.03)), True)
    a2 = a1 + 0.02 * 0.03 * size  # carried over, not reset
    assert sched.propose(3).learning_rate == pytest.approx(0.1 * (1 + a2), rel=1e-5)
    sched.learn(types.SimpleNamespace(update=update(50.0)), True)  # a hugely negative
    assert sched.propose(4).learning_rate == task.bounds.lower.learning_rate


def _cl_reference(displacements, previous_global, clients):
    """FedHyper-CL's factors, written out in NumPy: the rate factor each step used."""
    beta, prev, used = 1.0, previous_global, []
    for k, d in enumerate(displacements, start=1):
        used.append(beta)
        if k >= 2:
            gamma = min(1.1, 1 + 0.1 * float(d @ previous_global) / clients + float(d @ prev))
            beta = min(max(gamma * beta, 0.1), 10.0)
            prev = d
    return used, beta


def test_fedhyper_cl_factor_by_hand():
    rule = ClientRate(clients=4)
    delta = np.array([1.0, 0.0])
    steps = [np.array(d) for d in ([0.5, 0.5], [0.2, 0.0], [-2.0, 0.0], [-1.0, 0.0], [-50.0, 0.0], [0.0, 0.0])]
    # By hand (beta after step k is the factor of step k + 1): step 1 moves only. Step 2: gamma =
    # 1 + 0.1 * 0.2 / 4 + <(0.2, 0), Delta> = 1.205 -> 1.1. Step 3: gamma = 1 - 0.05 +
    # <(-2, 0), (0.2, 0)> = 0.55, beta = 0.605. Step 4: gamma = 1 - 0.025 + 2 -> 1.1, beta =
    # 0.6655. Step 5: gamma = 1 - 1.25 + 50 -> 1.1, beta = 0.73205. Step 6: gamma = 1, unchanged.
    want_used = [1.0, 1.0, 1.1, 0.605, 0.6655, 0.73205]
    used, final = _cl_reference(steps, delta, 4)
    assert used == pytest.approx(want_used) and final == pytest.approx(0.73205)
    state = rule.init({"w": jnp.asarray(delta, jnp.float32)})
    got = []
    for d in steps:
        got.append(float(rule.factor(state)))
        state = rule.update(state, {"w": jnp.asarray(delta, jnp.float32)}, {"w": jnp.asarray(d, jnp.float32)})
    assert got == pytest.approx(want_used, rel=1e-6)
    assert float(rule.report(state)) == pytest.approx(0.73205, rel=1e-6)
    # The clip at 0.1 and at 10.
    low = rule.init({"w": jnp.zeros(2)})
    for d in ([1.0, 0.0], [-30.0, 0.0], [1.0, 0.0], [-30.0, 0.0], [1.0, 0.0], [-30.0, 0.0]):
        low = rule.update(low, {"w": jnp.zeros(2)}, {"w": jnp.asarray(d)})
    assert float(low.beta) == pytest.approx(0.1)
    high = rule.init({"w": jnp.zeros(2)})
    for _ in range(40):
        high = rule.update(high, {"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
    assert float(high.beta) == pytest.approx(10.0)


@pytest.mark.parametrize("resident", [True, False])
def test_fedhyper_cl_rates_reach_each_clients_steps(resident):
    # Two rounds of FedHyper-FULL's engine (GM on the server, CL on the clients): every
    # client's update must be hand-run SGD whose step k uses eta * beta_k from the NumPy
    # rule above, with the previous round's mean update as Delta_{t-1} (zero in round 0).
    task = toy_task(clients_per_round=3)
    rule = ClientRate(clients=3)
    engine = Engine(
        task, seed=2, server_optimizer=keep_update(fedhyper_server()), local_rate=rule,
        resident_bytes=(1 << 30) if resident else 1,
    )
    assert engine.resident is resident
    hp = HParams(1.5, 3.0, 5.0)
    model, ids = task.model, list(task.train.client_ids())
    state = engine.init()
    previous = np.zeros_like(flat(state.params))
    moved = False
    for rnd in range(2):
        x0 = state.params
        deltas, sizes, finals = [], [], []
        for c in engine.sampled(rnd):
            part = {k: np.asarray(v) for k, v in task.train.get_client(ids[c]).all_examples().items()}
            n = len(part["y"])
            plan = batch_indices(n, hp.local_steps(n), hp.batch_int, client_rng(2, rnd, int(c)))
            p, beta, prev = x0, 1.0, previous
            for k, rows in enumerate(plan, start=1):
                g = jax.grad(_mean_loss, argnums=1)(model, p, {key: v[rows] for key, v in part.items()})
                new = jax.tree_util.tree_map(lambda a, b, lr=hp.learning_rate * beta: a - lr * b, p, g)
                d = flat(new) - flat(p)
                p = new
                if k >= 2:
                    gamma = min(1.1, 1 + 0.1 * float(d @ previous) / 3 + float(d @ prev))
                    beta, prev = min(max(gamma * beta, 0.1), 10.0), d
            deltas.append(flat(x0) - flat(p))
            sizes.append(n)
            finals.append(beta)
        u = np.tensordot(np.array(sizes) / sum(sizes), np.array(deltas), axes=1)
        state, res = engine.run_round(state, hp)
        np.testing.assert_allclose(flat(res.update), u, rtol=3e-4, atol=1e-6)
        np.testing.assert_allclose(res.local_rate, finals, rtol=1e-4)
        np.testing.assert_allclose(flat(state.opt_state.delta), -u, rtol=3e-4, atol=1e-6)
        moved = moved or not np.allclose(finals, 1.0, atol=1e-3)
        previous = -flat(res.update)  # Delta_t for the next round
    assert moved, "the rule never changed a client's rate: the example does not test it"
    assert engine.settings.as_dict()["local_rate"] == rule.name


def test_an_engine_without_a_local_rate_records_none_and_keeps_its_settings():
    engine = Engine(toy_task(), seed=0)
    _, res = engine.run_round(engine.init(), HParams(0.1, 1.0, 10.0))
    assert res.local_rate is None and "local_rate" not in engine.settings.as_dict()
    assert not any("rate" in k for k in engine.compile_counts)


def test_a_local_rate_without_its_server_state_is_refused():
    with pytest.raises(ValueError, match="fedhyper-cl.*keep_update"):
        Engine(toy_task(), local_rate=ClientRate(clients=4))
    with pytest.raises(TypeError, match="local_rate must be None or a LocalRate"):
        Engine(toy_task(), local_rate=0.5)
    with pytest.raises(ValueError, match=r"clients must be a positive number \(N C\), got 0"):
        ClientRate(clients=0)


# ------------------------------------------------------------ the tuners' runs
PEERS = ["fedex", "fedhyper-g", "fedhyper-gm", "fedhyper-sl", "fedhyper-cl", "fedhyper-full", "fathom+server"]


@pytest.mark.parametrize("name", PEERS)
def test_peer_runs_are_recorded_one_trial_per_round_and_deterministic(name):
    task = toy_task().replace(num_rounds=6, eval_every=2)
    tuner = tuners.get(name)
    one, two = tuner.run(task, seed=3), tuner.run(task, seed=3)
    assert np.array_equal(flat(one.params), flat(two.params))
    other = tuner.run(task, seed=4)
    assert not np.array_equal(flat(one.params), flat(other.params))
    run = record.read_run(one.study)
    assert run.unit == "round" and run.tuner == name and len(run.steps) == 6
    assert [t.user_attrs[record.ROUND] for t in one.study.trials] == list(range(6))
    assert run.ledger == one.cost and run.hparams == one.hparams
    assert task.bounds.contains(one.hparams)
    for t in one.study.trials:
        assert task.bounds.contains(HParams(**t.params))
    assert (run.cost_to_target()) == (one.rounds_to_target, one.examples_to_target)
    assert len(run.evaluations) == 3


def test_fedex_records_every_clients_arms_and_the_distribution():
    task = toy_task().replace(num_rounds=4, eval_every=2)
    out = tuners.get("fedex").run(task, seed=0)
    cands = out.study.user_attrs[record.FEDEX_CANDIDATES]
    for t in out.study.trials:
        arms = t.user_attrs[record.FEDEX_ARMS]
        assert len(arms) == task.clients_per_round
        for config in arms:
            for n, v in zip(fathom_tune.hparams.NAMES, config):
                assert v in cands[n]
        theta = t.user_attrs[record.FEDEX_THETA]
        assert all(math.isclose(sum(p), 1.0) for p in theta.values())
    final = out.study.trials[-1].user_attrs[record.FEDEX_THETA]
    assert out.hparams == HParams(**{n: cands[n][int(np.argmax(final[n]))] for n in final})
    # FedEx's validation passes are in its cost: every client's local examples plus
    # two passes over its validation part.
    engine = Engine(task, seed=0, client_validation=0.2)
    first = out.study.trials[0]
    expected = 0
    for c, config in zip(engine.sampled(0), first.user_attrs[record.FEDEX_ARMS]):
        train, val = engine.client_split(int(c))
        hp = HParams(*config)
        expected += hp.local_steps(len(train)) * hp.batch_int + 2 * len(val)
    assert first.user_attrs[record.COST]["examples"] == expected


def test_fedex_stops_exploring_below_its_entropy_cutoff(tmp_path):
    # The uniform start over 5 x 3 x 3 arms has entropy log 45 = 3.81 nats. With the cutoff
    # just under it, the first step that sharpens the distribution ends exploration: from
    # the next round every client trains with the most likely arms, and theta stays.
    task = toy_task().replace(num_rounds=5, eval_every=5)
    cutoff = math.log(45) - 1e-3
    out = FedEx("fedex-cut", cutoff=cutoff).run(task, seed=1)
    trials = out.study.trials
    cands = out.study.user_attrs[record.FEDEX_CANDIDATES]

    def joint_entropy(theta):  # written out independently of the code
        return sum(-sum(p * math.log(p) for p in t if p > 0) for t in theta.values())

    stop = next(i for i, t in enumerate(trials) if not t.user_attrs[record.FEDEX_EXPLORING])
    assert joint_entropy(trials[stop].user_attrs[record.FEDEX_THETA]) < cutoff
    assert all(joint_entropy(t.user_attrs[record.FEDEX_THETA]) >= cutoff for t in trials[:stop])
    assert stop < len(trials) - 1, "exploration never stopped: the example does not test the cutoff"
    frozen = trials[stop].user_attrs[record.FEDEX_THETA]
    best = [cands[n][int(np.argmax(frozen[n]))] for n in fathom_tune.hparams.NAMES]
    for t in trials[stop + 1 :]:
        assert t.user_attrs[record.FEDEX_THETA] == frozen
        assert t.user_attrs[record.FEDEX_ARMS] == [best] * task.clients_per_round
    assert out.hparams == HParams(*best)
    # Without a cutoff nothing of it is recorded.
    plain = FedEx("fedex-plain").run(task.replace(num_rounds=2), seed=1)
    assert all(record.FEDEX_EXPLORING not in t.user_attrs for t in plain.study.trials)
    with pytest.raises(ValueError, match="cutoff"):
        FedEx(cutoff=-1.0)


def test_fedhyper_divergence_discards_the_round_and_halves_the_rate():
    task = toy_task(
        init_hparams=HParams(1e38, 3.0, 5.0), bounds=Bounds(HParams(1e-4, 0.01, 1.0), HParams(1e38, 10.0, 256.0))
    ).replace(num_rounds=3)
    out = FedHyper("fedhyper-gm", "gm").run(task)
    h = out.history
    assert h["diverged"].iloc[0] and not h["accepted"].iloc[0]
    assert h["learning_rate"].iloc[1] == pytest.approx(0.5e38)
    first = out.study.trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs[record.DIVERGED] is True
    assert np.isfinite(flat(out.params)).all() and out.cost.rounds == 3


def test_fedex_divergence_discards_the_round_and_moves_away_from_the_arm():
    task = toy_task(bounds=Bounds(HParams(1e-4, 0.01, 1.0), HParams(1e38, 10.0, 256.0))).replace(num_rounds=6)
    fedex = FedEx("fedex-div", learning_rate_factors=(1.0, 1e39), local_epochs_factors=(1.0,), batch_size_factors=(1.0,))
    out = fedex.run(task, seed=1)
    trials = out.study.trials
    diverged = [t for t in trials if t.state == TrialState.FAIL]
    assert diverged and all(t.user_attrs[record.DIVERGED] for t in diverged)
    previous = 0.5
    for t in trials:
        now = t.user_attrs[record.FEDEX_THETA]["learning_rate"][1]
        if t.state == TrialState.FAIL:
            assert now < previous  # the diverging arm lost weight
        previous = now
    assert out.hparams.learning_rate == pytest.approx(0.1)
    assert np.isfinite(flat(out.params)).all()


class _Crash(Exception):
    pass


@pytest.mark.parametrize(
    "name", ["fedex", "fedhyper-sl", "fedhyper-gm", "fedhyper-full", FedEx("fedex-cut", cutoff=math.log(45) - 1e-3)]
)
def test_interrupted_peer_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, name):
    task = toy_task().replace(num_rounds=7, eval_every=2)
    tuner = tuners.get(name) if isinstance(name, str) else name
    url = f"sqlite:///{tmp_path}/s.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = crash_in_round(monkeypatch, 4, _Crash)
    with pytest.raises(_Crash):
        tuner.run(task, seed=2, storage=url, checkpoint_dir=tmp_path / "a")
    monkeypatch.setattr(Engine, "run_round", real)
    resumed = tuner.run(task, seed=2, storage=url, checkpoint_dir=tmp_path / "a")
    plain = tuner.run(task, seed=2, storage=f"sqlite:///{tmp_path}/p.db", checkpoint_dir=tmp_path / "b")
    assert np.array_equal(flat(resumed.params), flat(plain.params))
    assert resumed.hparams == plain.hparams
    assert [t.params for t in resumed.study.trials] == [t.params for t in plain.study.trials]
    got = [{k: v for k, v in t.user_attrs.items() if k != record.COST} for t in resumed.study.trials]
    want = [{k: v for k, v in t.user_attrs.items() if k != record.COST} for t in plain.study.trials]
    assert got == want
    # A finished run asked again is read back from the storage.
    again = tuner.run(task, seed=2, storage=url, checkpoint_dir=tmp_path / "a")
    assert len(again.study.trials) == 7 and again.hparams == plain.hparams


def test_rounds_recorded_past_the_checkpoint_are_replayed_not_written_again(tmp_path, monkeypatch):
    task = toy_task().replace(num_rounds=6, eval_every=2)
    url = f"sqlite:///{tmp_path}/s.db"
    real_save = peer_run.ckpt.save_run

    def save(path, *, progress, **kw):
        if len(progress.rows) == 4:  # round 3 is in the study, the checkpoint stays at round 3
            raise _Crash
        return real_save(path, progress=progress, **kw)

    monkeypatch.setattr(peer_run.ckpt, "save_run", save)
    monkeypatch.setattr(peer_run, "FLUSH_SECONDS", 0.0)  # a write and a checkpoint every round
    with pytest.raises(_Crash):
        tuners.get("fedex").run(task, seed=5, storage=url, checkpoint_dir=tmp_path)
    study = optuna.load_study(study_name="toy/fedex/seed5", storage=url)
    assert len(study.trials) == 4
    monkeypatch.setattr(peer_run.ckpt, "save_run", real_save)
    resumed = tuners.get("fedex").run(task, seed=5, storage=url, checkpoint_dir=tmp_path)
    plain = tuners.get("fedex").run(task, seed=5)
    assert [t.user_attrs[record.ROUND] for t in resumed.study.trials] == list(range(6))
    assert np.array_equal(flat(resumed.params), flat(plain.params))


def test_a_peer_writes_its_rounds_in_batches_and_flushes_them_on_an_interrupt(tmp_path, monkeypatch):
    # A fast run writes every round in one transaction at the end (one checkpoint after
    # it); a run stopped in round 4 still writes rounds 0-3 and checkpoints them.
    task = toy_task().replace(num_rounds=6, eval_every=2)
    batches, saves = [], []
    real_add, real_save = _one_run.add_trials, peer_run.ckpt.save_run
    monkeypatch.setattr(_one_run, "add_trials", lambda study, trials: (batches.append(len(trials)), real_add(study, trials)))
    monkeypatch.setattr(
        peer_run.ckpt, "save_run", lambda path, **kw: (saves.append(len(kw["progress"].rows)), real_save(path, **kw))[1]
    )
    monkeypatch.setattr(peer_run, "FLUSH_SECONDS", 3600.0)
    (tmp_path / "a").mkdir()
    out = tuners.get("fedhyper-gm").run(task, seed=1, storage=f"sqlite:///{tmp_path}/a.db", checkpoint_dir=tmp_path / "a")
    assert [t.user_attrs[record.ROUND] for t in out.study.trials] == list(range(6))
    assert batches[-1] == 6 and sum(batches) == 6 and saves == [6]
    batches.clear()
    saves.clear()
    (tmp_path / "b").mkdir()
    crash_in_round(monkeypatch, 4, _Crash)
    url = f"sqlite:///{tmp_path}/b.db"
    with pytest.raises(_Crash):
        tuners.get("fedhyper-gm").run(task, seed=1, storage=url, checkpoint_dir=tmp_path / "b")
    study = optuna.load_study(study_name="toy/fedhyper-gm/seed1", storage=url)
    assert [t.user_attrs[record.ROUND] for t in study.trials] == [0, 1, 2, 3]
    assert saves == [4]
