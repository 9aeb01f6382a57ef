import dataclasses
import inspect
import math
import re

import _toy
import fedjax
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _toy import flat, mlp_model, toy_task

import fathom_tune.fathom.hypergrad
from fathom_tune import HParams
from fathom_tune.engine import (
    Cost,
    Engine,
    ServerState,
    bucket_size,
    default_buckets,
    fine_buckets,
    sample_clients,
)
from fathom_tune.engine.batching import batch_indices, client_rng
from fathom_tune.engine.xla_options import (
    _YNN_WITHOUT_CONVOLUTIONS,
    compiler_options,
    cpu_compiler_options,
)
from fathom_tune.fathom import LocalAgreement, local_hypergradient
from fathom_tune.hparams import ClientHParams


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_full_batch_round_matches_independent_gradient_descent():
    # Equal clients of 10 examples, B = 10 (padded to the bucket 12), E = 3:
    # every client runs K = 3 full-batch gradient steps, whatever the shuffle.
    task = toy_task(sizes=(10,) * 5, clients_per_round=3)
    eng = Engine(task, seed=3, client_statistic=LocalAgreement())
    state = eng.init()
    hp = HParams(learning_rate=0.3, local_epochs=3.0, batch_size=10.0)
    new_state, res = eng.run_round(state, hp)

    model = task.model
    x0 = state.params

    def loss(p, batch):
        return jnp.mean(model.train_loss(batch, model.apply_for_train(p, batch, None)))

    deltas, phis, losses = [], [], []
    for cid in res.client_ids:
        batch = task.train.get_client(cid).all_examples()
        p = x0
        phi, ls = 1.0, []
        for _ in range(3):
            value, g = jax.value_and_grad(loss)(p, batch)
            p = jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, p, g)
            phi = min(phi, cos(flat(g), flat(x0) - flat(p)))
            ls.append(float(value))
        deltas.append(flat(x0) - flat(p))
        phis.append(phi)
        losses.append(np.mean(ls))
    u = np.mean(deltas, axis=0)  # equal sizes: equal weights

    assert list(res.local_steps) == [3, 3, 3]
    np.testing.assert_allclose(flat(res.update), u, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(flat(new_state.params), flat(x0) - u, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(res.statistic, phis, atol=1e-4)
    assert local_hypergradient(res.statistic, res.num_examples) == pytest.approx(np.mean(phis), abs=1e-4)
    assert res.train_loss == pytest.approx(np.mean(losses), rel=1e-4)
    assert new_state.round == 1
    assert res.cost.examples == 3 * 3 * 10 and res.cost.steps == 9


def test_unequal_clients_linear_loss_one_epoch_matches_closed_form():
    # A loss linear in the parameters has a constant per-example gradient, so one
    # epoch of K_i = n_i / B steps moves a client by eta / B * (sum of its
    # per-example gradients), whatever the order of the batches.
    sizes = (20, 40, 60, 30)
    task = toy_task(sizes=sizes, clients_per_round=4, model=mlp_model(linear_loss=True))
    eng = Engine(task, seed=0)
    state = eng.init()
    hp = HParams(learning_rate=0.5, local_epochs=1.0, batch_size=10.0)
    _, res = eng.run_round(state, hp)

    model = task.model

    def summed(p, batch):
        return jnp.sum(model.train_loss(batch, model.apply_for_train(p, batch, None)))

    n = np.array([task.train.client_size(c) for c in res.client_ids])
    deltas = []
    for cid in res.client_ids:
        batch = task.train.get_client(cid).all_examples()
        deltas.append(0.5 / 10 * flat(jax.grad(summed)(state.params, batch)))
    u = np.sum(np.array(deltas) * (n / n.sum())[:, None], axis=0)

    assert list(res.local_steps) == list(n // 10)
    np.testing.assert_allclose(flat(res.update), u, rtol=1e-4, atol=1e-6)
    assert res.cost.examples == int(n.sum()) and res.cost.steps == int(n.sum() // 10)


@pytest.mark.parametrize("client_block", [1, 2, 4])
def test_padding_blocks_and_chunks_do_not_change_the_math(client_block):
    task = toy_task()
    hp = HParams(learning_rate=0.2, local_epochs=1.3, batch_size=7.0)  # B=7 pads to 8
    phi = LocalAgreement()
    exact = Engine(task, seed=1, buckets=range(1, 300), client_block=4, steps_per_call=16, client_statistic=phi)
    other = Engine(task, seed=1, client_block=client_block, steps_per_call=3, client_statistic=phi)
    a, b = exact.init(), other.init()
    for _ in range(3):
        a, ra = exact.run_round(a, hp)
        b, rb = other.run_round(b, hp)
    np.testing.assert_allclose(flat(a.params), flat(b.params), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ra.statistic, rb.statistic, atol=1e-5)
    assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-5)


def test_resident_rounds_train_on_each_clients_shuffles_drawn_ahead_or_not(monkeypatch):
    """Every resident round's plan holds each client's batch_indices (shuffle, repeat),
    whether it was drawn during the round before (same steps and batch size) or made
    in the round (epochs, batch size or the plan's rows changed; a round of per-client
    hyperparameters), and the model is bit for bit the one of an engine that draws
    no plan ahead."""
    task = toy_task(sizes=(30, 47, 12, 64, 5), clients_per_round=3)
    a = ClientHParams(clients=(HParams(0.1, 1.0, 7.0),) * 3, summary=HParams(0.1, 1.0, 7.0))
    hps = [
        (HParams(0.1, 1.0, 7.0), False),  # first round: nothing drawn ahead
        (HParams(0.3, 1.0, 7.0), True),  # learning rate only: drawn ahead
        (HParams(0.3, 2.5, 7.0), False),  # epochs
        (HParams(0.3, 2.5, 7.0), True),
        (HParams(0.3, 2.5, 5.0), False),  # batch size
        (HParams(0.3, 14.0, 1.0), False),  # past the bounds: more rows
        (HParams(0.3, 14.0, 1.0), True),
        (a, False),
        (HParams(0.1, 1.0, 7.0), False),  # after per-client hyperparameters
    ]

    def run(draw_plans):
        eng = Engine(task, seed=3)
        assert eng.resident
        used = []
        real_call, real_ahead = eng._programs.block_round, eng._path.draw_ahead

        def block_round(x0, opt_state, u, data, plan, ints, *rest):
            used.append((plan, ints, any(plan is q for q in getattr(ahead[0], "plans", ()))))
            return real_call(x0, opt_state, u, data, plan, ints, *rest)

        monkeypatch.setattr(eng._programs, "block_round", block_round)
        monkeypatch.setattr(eng._path, "draw_ahead", lambda r, hp: real_ahead(r, hp if draw_plans else None))
        s = eng.init()
        for hp, _ in hps:
            ahead = [eng._path._ahead]
            s, res = eng.run_round(s, hp)
            each = hp.clients if isinstance(hp, ClientHParams) else [hp] * len(res.num_examples)
            assert list(res.local_steps) == [h.local_steps(int(n)) for h, n in zip(each, res.num_examples)]
        monkeypatch.undo()
        return eng, used, flat(s.params)

    eng, used, params = run(True)
    assert [hit for _, _, hit in used] == [hit for _, hit in hps]
    offsets = np.concatenate([[0], np.cumsum(eng._data.sizes)[:-1]])
    for rnd, (plan, ints, _) in enumerate(used):
        p = eng.client_block
        b = int(ints[2 * p])
        for j in range(p):
            k, c = int(ints[j]), int(ints[p + j])
            own = batch_indices(int(eng._data.sizes[c]), k, b, client_rng(3, rnd, c))
            np.testing.assert_array_equal(plan[j, :k, :b], own + offsets[c])
            assert (plan[j, :k, b:] == offsets[c]).all()
    assert used[6][0].shape[1] > used[4][0].shape[1]  # E = 14 at B = 1 grew the plan

    _, not_ahead, same = run(False)
    assert not any(hit for _, _, hit in not_ahead)
    assert np.array_equal(params, same)


@pytest.mark.parametrize("gather_bytes", [1, 3 * 2 * 2 * 8 * 4 * 17, None])
def test_host_rounds_train_on_each_clients_shuffles_however_many_calls_a_gather_holds(
    monkeypatch, gather_bytes
):
    """On the host path, each call's batches are the block's clients' examples at
    their batch_indices (padding slots and inactive steps
    at example 0; the block's empty slot repeats its first client), whether one
    gather serves one call, three or all of them; the model is bit for bit the
    same either way."""
    from fathom_tune.engine import host

    task = toy_task(sizes=(30, 47, 12, 64, 5), clients_per_round=3)
    hp = HParams(0.2, 1.5, 7.0)  # bucket 8; K = 7, 11, 3, 14, 2 by client

    def run(span_bytes):
        if span_bytes is not None:  # 1: a gather per call; else 3 calls of 2 clients x 2 steps x 8 x 17 floats
            monkeypatch.setattr(host, "GATHER_BYTES", span_bytes)
        eng = Engine(task, seed=3, resident_bytes=1, client_block=2, steps_per_call=2)
        assert not eng.resident
        calls, real = [], eng._programs.local_steps

        def local_steps(*a):
            arg = inspect.signature(real).bind(*a).arguments
            calls.append({k: arg[k] for k in ("batches", "step0")})
            calls[-1].update(n_steps=np.asarray(arg["n_steps"]), cidx=np.asarray(arg["cidx"]))
            return real(*a)

        monkeypatch.setattr(eng._programs, "local_steps", local_steps)
        s = eng.init()
        for _ in range(2):
            s, _ = eng.run_round(s, hp)
        monkeypatch.undo()
        return eng, calls, flat(s.params)

    eng, calls, params = run(gather_bytes)
    rnd, seen = 0, 0
    for call in calls:
        if call["step0"] == 0:
            seen += 1
        rnd = (seen - 1) // 2  # two blocks a round (3 clients, 2 per block)
        for j, (k, c) in enumerate(zip(call["n_steps"], call["cidx"])):
            if k == 0:  # the block's empty slot (3 clients in blocks of 2): its first client's batches
                for key in ("x", "y"):
                    np.testing.assert_array_equal(call["batches"][key][j], call["batches"][key][0])
                continue
            ex = eng._data.examples(int(c))
            own = batch_indices(int(eng._data.sizes[c]), int(k), 7, client_rng(3, rnd, int(c)))
            for s in range(2):
                step = call["step0"] + s
                want = np.zeros(8, np.int64)
                if step < k:
                    want[:7] = own[step]
                for key in ("x", "y"):
                    np.testing.assert_array_equal(call["batches"][key][j, s], ex[key][want])
    assert seen == 4
    _, _, default = run(None)
    assert np.array_equal(params, default)


def test_same_seed_identical_parameters_and_other_seed_differs():
    task = toy_task()
    hps = [HParams(0.1, 1.0, 10.0), HParams(0.05, 2.0, 5.0), HParams(0.2, 0.5, 17.0)]

    def run(seed):
        eng = Engine(task, seed=seed)
        s = eng.init()
        for hp in hps:
            s, _ = eng.run_round(s, hp)
        return flat(s.params)

    first, second = run(7), run(7)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, run(8))


def test_client_sampling_is_a_function_of_seed_and_round():
    a = [tuple(sample_clients(5, r, 100, 10)) for r in range(20)]
    b = [tuple(sample_clients(5, r, 100, 10)) for r in range(20)]
    assert a == b
    assert all(len(set(s)) == 10 and min(s) >= 0 and max(s) < 100 for s in a)
    assert len(set(a)) == 20  # rounds differ
    counts = np.bincount(np.concatenate([sample_clients(0, r, 10, 3) for r in range(3000)]), minlength=10)
    # Uniform: each of 10 clients is picked with probability 3/10 per round.
    assert np.all(np.abs(counts / 3000 - 0.3) < 0.03)


def test_batch_size_sweep_compiles_a_bounded_number_of_programs():
    task = toy_task(sizes=(300,) * 4, clients_per_round=2)
    eng = Engine(task, seed=0, steps_per_call=2)
    s = eng.init()
    sweep = [HParams(0.05, 0.5, float(b)) for b in np.geomspace(4, 256, 40)]
    for hp in sweep:
        s, _ = eng.run_round(s, hp)
    buckets_met = {bucket_size(hp.batch_int, default_buckets()) for hp in sweep}
    assert eng.compile_counts["local_steps"] == len(buckets_met) == 13
    before = eng.compile_count
    # Learning rate and local epochs (here up to 9 of the bounds' 10) compile nothing.
    for lr, e in [(0.01, 0.2), (0.3, 3.0), (0.001, 9.0)]:
        s, _ = eng.run_round(s, HParams(lr, e, 200.0))  # 200 -> bucket 256, already compiled
    assert eng.compile_count == before


def test_close_ladder_pads_under_a_sixteenth_and_not_at_all_at_common_sizes():
    ladder = fine_buckets()
    # Worked out by hand: 4..16 (13), 18..64 even (24), 68..128 by 4 (16), 136..256 by 8 (16).
    assert len({bucket_size(b, ladder) for b in range(4, 257)}) == 13 + 24 + 16 + 16 == 69
    for b in [*range(1, 17), *range(18, 65, 2), 128, 256, 1024, 1 << 16]:
        assert bucket_size(b, ladder) == b
    assert bucket_size(51, ladder) == 52 and bucket_size(65, ladder) == 68 and bucket_size(129, ladder) == 136
    worst = max((bucket_size(b, ladder) - b) / b for b in range(1, (1 << 16) + 1))
    assert worst == 2047 / 32769  # 32769 pads to 34816: steps of 2048 from 32768
    assert fine_buckets(100)[-1] == 100 and fine_buckets(101)[-1] == 104


def test_server_optimizer_sees_the_mean_update_as_a_gradient():
    task = toy_task()
    eng = Engine(task, seed=0, server_optimizer=optax.sgd(0.5))
    s = eng.init()
    s2, res = eng.run_round(s, HParams(0.1, 1.0, 10.0))
    np.testing.assert_allclose(flat(s2.params), flat(s.params) - 0.5 * flat(res.update), rtol=1e-5, atol=1e-7)


def test_cost_counts_bytes_examples_and_steps():
    task = toy_task(sizes=(30, 45, 60, 25, 50, 40), clients_per_round=3)
    eng = Engine(task, seed=0)
    s = eng.init()
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(s.params))
    _, res = eng.run_round(s, HParams(0.1, 2.0, 8.0))
    expected_steps = [max(math.ceil(2.0 * n / 8), 1) for n in res.num_examples]
    assert list(res.local_steps) == expected_steps
    assert res.cost.examples == 8 * sum(expected_steps)
    assert res.cost.bytes_down == 3 * 4 * n_params
    assert res.cost.bytes_up == 3 * (4 * n_params + 12)
    assert res.cost.rounds == 1 and res.cost.seconds > 0
    total = res.cost + res.cost
    assert total.rounds == 2 and total.examples == 2 * res.cost.examples


def test_evaluate_matches_fedjax_evaluate_model():
    task = toy_task()
    eng = Engine(task, seed=0, eval_batch_size=32)
    s = eng.init()
    s, _ = eng.run_round(s, HParams(0.1, 1.0, 10.0))
    ours = eng.evaluate(s.params, "validation")
    batches = fedjax.padded_batch_client_datasets([ds for _, ds in task.validation.clients()], batch_size=16)
    ref = fedjax.evaluate_model(task.model, s.params, batches)
    assert set(ours) == {"loss", "accuracy"}
    for k in ours:
        assert ours[k] == pytest.approx(float(ref[k]), rel=1e-5)
    # accuracy over 103 pooled examples is a multiple of 1/103
    assert round(ours["accuracy"] * 103, 4) == round(ours["accuracy"] * 103)


def test_divergent_round_is_reported_not_finite():
    task = toy_task()
    eng = Engine(task, seed=0)
    s = eng.init()
    _, res = eng.run_round(s, HParams(1e38, 3.0, 5.0))
    assert res.finite is False
    _, ok = eng.run_round(s, HParams(0.1, 1.0, 10.0))
    assert ok.finite is True


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"client_statistic": "phi"}, TypeError, "client_statistic"),
        ({"server_optimizer": "sgd"}, TypeError, "server_optimizer"),
        ({"buckets": (4, 2)}, ValueError, "buckets"),
        ({"buckets": ()}, ValueError, "buckets"),
        ({"client_block": 0}, ValueError, "client_block"),
        ({"steps_per_call": 0}, ValueError, "steps_per_call"),
        ({"eval_batch_size": True}, TypeError, "eval_batch_size"),
        ({"devices": 0}, ValueError, r"devices must be between 1 and the 1 local device\(s\) of the cpu backend, got 0"),
        ({"devices": 2}, ValueError, r"devices must be between 1 and the 1 local device\(s\).*got 2"),
        ({"devices": "gpu"}, TypeError, r"devices must be None, an int or a sequence of jax devices, got 'gpu'"),
        ({"devices": True}, TypeError, "devices must be None"),
        ({"resident_bytes": 0}, ValueError, "resident_bytes"),
    ],
)
def test_engine_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Engine(toy_task(), **kwargs)


def test_a_static_engine_computes_no_statistic_and_the_same_model(monkeypatch):
    # The statistic is a hook: an engine without one never traces FATHOM's cosine,
    # and turning it on changes nothing about the model.
    calls = []
    real = fathom_tune.fathom.hypergrad.client_cosine
    monkeypatch.setattr(
        fathom_tune.fathom.hypergrad, "client_cosine", lambda g, d: calls.append(1) or real(g, d)
    )
    task = toy_task(model=mlp_model(hidden=7))  # a model of its own: nothing compiled yet
    hp = HParams(learning_rate=0.2, local_epochs=2.0, batch_size=5.0)
    static, tuned = Engine(task, seed=2), Engine(task, seed=2, client_statistic=LocalAgreement())
    s_static, r_static = static.run_round(static.init(), hp)
    assert calls == [] and r_static.statistic is None
    s_tuned, r_tuned = tuned.run_round(tuned.init(), hp)
    assert calls and r_tuned.statistic.shape == (task.clients_per_round,)
    np.testing.assert_array_equal(flat(s_static.params), flat(s_tuned.params))
    assert r_static.train_loss == r_tuned.train_loss


def test_engine_settings_tell_optimizers_apart_by_behaviour():
    task = toy_task()
    a = Engine(task, server_optimizer=optax.adam(1e-3)).settings
    assert a == Engine(task, server_optimizer=optax.adam(1e-3)).settings
    b = Engine(task, server_optimizer=optax.adam(1e-2)).settings
    assert a.server_optimizer != b.server_optimizer and a.buckets == b.buckets
    assert Engine(task).settings.server_optimizer == Engine(task, server_optimizer=optax.sgd(1.0)).settings.server_optimizer
    assert Engine(task, client_statistic=LocalAgreement()).settings.client_statistic == "phi"


def test_run_round_and_evaluate_reject_bad_arguments():
    eng = Engine(toy_task(), seed=0)
    s = eng.init()
    with pytest.raises(TypeError, match="hparams"):
        eng.run_round(s, {"learning_rate": 0.1})
    with pytest.raises(TypeError, match="state"):
        eng.run_round(s.params, HParams(0.1, 1.0, 10.0))
    with pytest.raises(ValueError, match="split"):
        eng.evaluate(s.params, "valid")
    with pytest.raises(TypeError, match="task"):
        Engine("digits")
    big = toy_task(sizes=(4,) * 3, clients_per_round=1)
    with pytest.raises(ValueError, match="largest bucket"):
        Engine(big, buckets=(1, 2, 4)).run_round(ServerState(s.params, None), HParams(0.1, 1.0, 8.0))


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("learning_rate", 0.0, ValueError, "learning_rate"),
        ("learning_rate", -1.0, ValueError, "learning_rate"),
        ("local_epochs", float("nan"), ValueError, "local_epochs"),
        ("batch_size", float("inf"), ValueError, "batch_size"),
        ("batch_size", "20", TypeError, "batch_size"),
        ("local_epochs", True, TypeError, "local_epochs"),
    ],
)
def test_hparams_reject_non_positive_or_non_finite(field, value, error, match):
    good = {"learning_rate": 0.1, "local_epochs": 1.0, "batch_size": 20.0}
    good[field] = value
    with pytest.raises(error, match=match):
        HParams(**good)


def test_cost_and_hparams_integer_conventions():
    assert HParams(0.1, 1.0, 2.5).batch_int == 3  # round half up
    assert HParams(0.1, 1.0, 0.3).batch_int == 1
    assert HParams(0.1, 0.01, 20.0).local_steps(130) == 1  # at least one step
    assert HParams(0.1, 1.0, 20.0).local_steps(130) == 7  # ceil(6.5)
    assert Cost() + Cost(rounds=1) == Cost(rounds=1)


def test_cost_adds_and_lists_every_field():
    """Cost's sum and as_dict are written field by field: each field counts."""
    names = [f.name for f in dataclasses.fields(Cost)]
    a = Cost(**{n: 10 ** i for i, n in enumerate(names)})
    b = Cost(**{n: 3 * 10 ** i for i, n in enumerate(names)})
    assert (a + b).as_dict() == {n: 4 * 10 ** i for i, n in enumerate(names)}
    assert a.as_dict() == dataclasses.asdict(a) and list(a.as_dict()) == names


def _unrolled_model(steps):
    """A recurrent toy model: one tanh cell applied ``steps`` times, unrolled in Python."""

    def forward(batch):
        cell = hk.Linear(_toy.FEATURES)
        h = batch["x"]
        for _ in range(steps):
            h = jax.nn.tanh(cell(h))
        return hk.Linear(_toy.NUM_CLASSES)(h)

    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward),
        sample_batch={"x": np.zeros((1, _toy.FEATURES), np.float32)},
        train_loss=lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(
            batch["y"], preds
        ),
        eval_metrics={"accuracy": fedjax.metrics.Accuracy()},
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule is for XLA:CPU")
def test_cpu_trains_long_unrolled_models_one_client_at_a_time():
    # Each unrolled step adds a few operations (dot, add, tanh...): 10 steps stay
    # far below the threshold, 100 steps far above it.
    short = Engine(toy_task(model=_unrolled_model(10)))
    long = Engine(toy_task(model=_unrolled_model(100)))
    assert (short.client_block, short.steps_per_call) == (4, 1)  # all 4 clients vmapped, resident
    assert (long.client_block, long.steps_per_call) == (1, 1)
    # An explicit choice is kept.
    assert Engine(toy_task(model=_unrolled_model(100)), client_block=2).client_block == 2


def _ynn_convolutions(hlo_text: str) -> int:
    """Convolutions that the compiled ``hlo_text`` hands to YNNPACK (its ``__ynn_fusion``s)."""
    bodies = dict(re.findall(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.DOTALL))
    ynn = r"calls=(%[\w.\-]+), backend_config=\{\"fusion_config\":\{\"kind\":\"__ynn_fusion\""
    called = re.findall(ynn, hlo_text)
    return sum("convolution(" in bodies.get(name, "") for name in called)


def _conv_task():
    rng = np.random.default_rng(0)
    data = fedjax.InMemoryFederatedData(
        {
            name: {
                "x": rng.random((n, 28, 28, 1), dtype=np.float32),
                "y": rng.integers(0, 62, n).astype(np.int32),
            }
            for name, n in ((b"a", 6), (b"b", 5))
        }
    )
    model = fedjax.models.emnist.create_conv_model(only_digits=False)
    return toy_task(model=model, train=data, validation=data, test=data, clients_per_round=2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are for XLA:CPU")
def test_cpu_programs_compile_convolutions_without_ynnpack(monkeypatch):
    if not cpu_compiler_options():
        pytest.skip("this jaxlib has no YNNPACK fusion option")
    task = _conv_task()
    engine = Engine(task, seed=0)
    progs = engine._programs
    calls, local_steps = [], progs.local_steps
    monkeypatch.setattr(progs, "local_steps", lambda *a: calls.append(a) or local_steps(*a))
    engine.run_round(engine.init(), HParams(0.1, 1.0, 4.0))
    engine_text = local_steps.lower(*calls[0]).compile().as_text()

    model, batch = task.model, task.train.get_client(b"a").all_examples()

    key = jax.random.PRNGKey(1)  # the model has dropout

    def sgd_step(params):
        def loss(p):
            return jnp.mean(model.train_loss(batch, model.apply_for_train(p, batch, key)))

        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))

    params = model.init(jax.random.PRNGKey(0))
    default_text = jax.jit(sgd_step).lower(params).compile().as_text()
    # What the option is for: by default XLA:CPU gives this model's convolutions to YNNPACK.
    assert _ynn_convolutions(default_text) >= 1, "XLA:CPU no longer uses YNNPACK for convolutions"
    assert engine_text.count("convolution(") >= 4  # forward and backward, XLA's own
    assert _ynn_convolutions(engine_text) == 0
    # The same step either way, to float32 rounding.
    with_options = jax.jit(sgd_step, compiler_options=compiler_options(jax.local_devices()))
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(with_options(params)), leaves(jax.jit(sgd_step)(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_host_path_steps_write_the_new_model_into_the_spare_buffer_without_copying_the_old(monkeypatch):
    """A host-path call reads the model from one buffer and writes the next into a
    donated spare: XLA copies no parameter array (with the model itself donated,
    it copied the conv model's 4.7 MB dense weights every step, as XLA cannot
    order the backward pass's reads before the in-place update)."""
    task = _conv_task()
    engine = Engine(task, seed=0)
    assert not engine.resident
    progs = engine._programs
    calls, local_steps = [], progs.local_steps
    monkeypatch.setattr(progs, "local_steps", lambda *a: calls.append(a) or local_steps(*a))
    engine.run_round(engine.init(), HParams(0.1, 1.0, 4.0))
    text = local_steps.lower(*calls[0]).compile().as_text()
    shapes = {
        "f32[1," + ",".join(map(str, x.shape)) + "]"
        for x in jax.tree_util.tree_leaves(jax.eval_shape(task.model.init, jax.random.PRNGKey(0)))
    }
    assert "f32[1,9216,128]" in shapes  # the dense weights
    entry = text[text.index("\nENTRY") :].split("\n}\n")[0]  # copies inside fusions are layout changes
    copied = {shape for shape in shapes if re.search(re.escape(shape) + r"\{[\d,]*\} copy\(", entry)}
    assert not copied
    # The spare's buffers are the outputs' (input_output_alias), the model's are not.
    aliased = {int(i) for i in re.findall(r"\((\d+), \{\}, may-alias\)", text)}
    n = len(shapes)
    spare = set(range(2 * n, 3 * n))  # x0 and the model come first (ctx is empty)
    assert spare <= aliased and not aliased & set(range(n, 2 * n))


def test_compiler_options_leave_gpus_and_the_users_xla_flags_alone(monkeypatch):
    class Gpu:
        platform = "gpu"

    assert compiler_options([Gpu()]) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    cpu_compiler_options.cache_clear()
    try:
        assert cpu_compiler_options() == ()
        assert compiler_options(jax.local_devices(backend="cpu")) is None
    finally:
        monkeypatch.undo()
        cpu_compiler_options.cache_clear()
    ours = {"xla_cpu_experimental_ynn_fusion_type": _YNN_WITHOUT_CONVOLUTIONS}
    assert dict(cpu_compiler_options()) in ({}, ours)
