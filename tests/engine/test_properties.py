"""Property-based tests (hypothesis) of the hypergradient math and the engine's batching.

Invariants that must hold for every input, next to the worked examples of
``test_hypergrad.py`` and ``test_engine.py``:

* cosines, ``phi``, ``G`` and ``H`` are finite and in ``[-1, 1]`` for any
  finite arrays, and equal an independent NumPy computation where float32
  can represent the sums;
* the EGN step never leaves the bounds, whatever the rates, ``H`` and ``G``;
* zero gradients and zero updates never give NaN;
* padding a batch up to a bigger bucket never changes a round, and every local
  step averages exactly ``B_int`` real examples, also for clients whose size is
  not a multiple of ``B_int``.

The engine properties share one model per kind, so every engine of a kind
reuses the compiled programs; compilations (one per bucket size met) are their
cost, hence the small example counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import fedjax
import haiku as hk
import jax
import numpy as np
import pytest
from _toy import FEATURES, NUM_CLASSES, flat, mlp_model, toy_task
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fathom_tune.engine import Engine, bucket_size, default_buckets
from fathom_tune.fathom import LocalAgreement
from fathom_tune.fathom.hypergrad import (
    ClientTracker,
    ServerTracker,
    aggregate_round,
    global_hypergradient,
    local_hypergradient,
    safe_cosine,
    update_momentum,
)
from fathom_tune.fathom.state import (
    FathomConfig,
    egn_step,
    hparams_from_log,
    log_hparams,
    next_hparams,
)
from fathom_tune.hparams import NAMES, Bounds, HParams


def budget(max_examples: int) -> settings:
    # No example database: failures print their example, and the tree stays clean.
    return settings(max_examples=max_examples, deadline=None, database=None)


# --------------------------------------------------------------------------- strategies

# Any finite float32, with the magnitudes that break naive cosines drawn often.
EXTREMES = [0.0, 1e-30, 1e30, 1e-45, 3.4e38, 1.0]
ANY_FINITE = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from(EXTREMES + [-x for x in EXTREMES]),
)
SHAPES = st.lists(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), min_size=1, max_size=3)


@st.composite
def trees(draw, count: int, elements=ANY_FINITE):
    """``count`` float32 pytrees (dicts of 1-3 leaves) of one structure and leaf shapes."""
    shapes = draw(SHAPES)
    return [
        {
            f"leaf{i}": draw(hnp.arrays(np.float32, shape, elements=elements))
            for i, shape in enumerate(shapes)
        }
        for _ in range(count)
    ]


# Well-scaled trees: entries 0 or of magnitude 1e-3..1e3, times one power of ten per
# tree in 1e-15..1e15; every square and every sum of squares is a normal float32.
_MANTISSA = st.one_of(
    st.just(0.0),
    st.floats(1e-3, 1e3),
    st.floats(-1e3, -1e-3),
)


@st.composite
def scaled_trees(draw, count: int):
    out = []
    for tree in draw(trees(count, elements=_MANTISSA)):
        scale = 10.0 ** draw(st.integers(-15, 15))
        out.append({k: (v.astype(np.float64) * scale).astype(np.float32) for k, v in tree.items()})
    return out


def well_scaled(*trees_) -> bool:
    """Whether every nonzero entry has a magnitude whose square is a normal float32."""
    x = np.abs(np.concatenate([flat(t) for t in trees_]))
    x = x[x > 0]
    return bool(np.all((x >= 1e-18) & (x <= 1e18)))


def np_cosine(a, b) -> float:
    """The cosine of two pytrees in float64 NumPy, 0 where a norm is 0."""
    x, y = flat(a), flat(b)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return 0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny))


def in_range(c) -> bool:
    c = float(c)
    return math.isfinite(c) and -1.0 <= c <= 1.0


def tree_sub(a, b):
    return {k: a[k] - b[k] for k in a}


def tree_scale(s, a):
    return {k: (np.float32(s) * v).astype(np.float32) for k, v in a.items()}


ALPHA = st.floats(0.0, 1.0, exclude_max=True)
UNIT = st.floats(-1.0, 1.0)
RATE = st.floats(0.0, 1e300)  # any rate >= 0, huge ones included (short of overflowing a step)


# ----------------------------------------------------------------------- 1. cosines in [-1, 1]


@budget(100)
@given(trees(2))
def test_safe_cosine_is_finite_and_in_range_for_any_finite_arrays(ab):
    a, b = ab
    c = safe_cosine(a, b)
    assert in_range(c)
    assert float(c) == float(safe_cosine(b, a))  # symmetric
    assert float(global_hypergradient(a, b)) == float(c)
    if not flat(a).any() or not flat(b).any():
        assert float(c) == 0.0


@budget(100)
@given(scaled_trees(2), st.floats(1e-3, 1e3))
def test_safe_cosine_equals_numpy_when_well_scaled(ab, s):
    a, b = ab
    c = safe_cosine(a, b)
    assert in_range(c) and float(c) == pytest.approx(np_cosine(a, b), abs=1e-5)
    if flat(a).any():  # parallel vectors, whose float32 ratio can round past +-1
        for other, sign in ((a, 1.0), (tree_scale(s, a), 1.0), (tree_scale(-s, a), -1.0)):
            c = safe_cosine(a, other)
            assert in_range(c)
            if well_scaled(other):
                assert float(c) == pytest.approx(sign, abs=1e-6)


@budget(50)
@given(st.integers(1, 4).flatmap(lambda k: trees(k + 1)), st.floats(1e-30, 1e30))
def test_client_tracker_phi_is_finite_and_at_most_one_for_any_steps(x0_and_grads, eta):
    x0, *grads = x0_and_grads
    tracker = ClientTracker.init(x0)
    x = x0
    with np.errstate(over="ignore", invalid="ignore"):  # huge steps overflow to inf
        for g in grads:
            x = {k: x[k] - np.float32(eta) * g[k] for k in x}
            tracker = tracker.update(g, x)
            assert in_range(tracker.phi)


@budget(60)
@given(st.integers(1, 4).flatmap(lambda k: scaled_trees(k + 1)), st.floats(1e-3, 1.0))
def test_client_tracker_phi_is_the_numpy_min_of_step_cosines(x0_and_grads, eta):
    x0, *grads = x0_and_grads
    tracker = ClientTracker.init(x0)
    x, cosines = x0, [1.0]
    for g in grads:
        x = {k: (x[k] - np.float32(eta) * g[k]).astype(np.float32) for k in x}
        delta = tree_sub(x0, x)  # d_k = x0 - x_{k+1} as a float32 array
        assume(well_scaled(g, delta))
        cosines.append(np_cosine(g, delta))
        tracker = tracker.update(g, x)
    assert float(tracker.phi) == pytest.approx(min(cosines), abs=1e-5)
    assert float(tracker.phi) <= 1.0


@budget(150)
@given(
    st.lists(UNIT, min_size=1, max_size=12).flatmap(
        lambda phis: st.tuples(
            st.just(phis), st.lists(st.integers(1, 10**12), min_size=len(phis), max_size=len(phis))
        )
    )
)
def test_local_hypergradient_is_the_clamped_weighted_mean(phis_and_counts):
    phis, counts = phis_and_counts
    G = local_hypergradient(phis, counts)
    n = np.asarray(counts, np.float64)
    assert in_range(G)
    assert G == pytest.approx(float(n @ np.asarray(phis) / n.sum()), abs=1e-12)
    assert min(phis) - 1e-12 <= G <= max(phis) + 1e-12


@budget(40)
@given(
    st.integers(1, 4).flatmap(lambda k: trees(2 * k + 1)),
    st.lists(st.integers(1, 1000), min_size=4, max_size=4),
    ALPHA,
)
def test_a_round_of_any_finite_updates_gives_g_and_h_in_range(data, counts, alpha):
    # Clients take one step each from x0 with arbitrary gradients; the server
    # aggregates and updates its moving average twice. Nothing may leave [-1, 1].
    x0, *rest = data
    k = len(rest) // 2
    grads, updates = rest[:k], rest[k:]
    phis, deltas = [], []
    with np.errstate(over="ignore", invalid="ignore"):
        for g in grads:
            x1 = {key: x0[key] - np.float32(0.1) * g[key] for key in x0}
            phis.append(float(ClientTracker.init(x0).update(g, x1).phi))
            deltas.append(tree_sub(x0, x1))
    u, G = aggregate_round(deltas, phis, counts[:k])
    assert all(in_range(p) for p in phis) and in_range(G)
    server = ServerTracker.init(x0, alpha=alpha)
    for upd in (u, *updates):
        H, server = server.update(upd)
        assert in_range(H)


@budget(50)
@given(st.integers(1, 5).flatmap(lambda k: scaled_trees(k)), ALPHA)
def test_server_tracker_matches_numpy_moving_average(updates, alpha):
    server = ServerTracker.init(updates[0], alpha=alpha)
    m = np.zeros_like(flat(updates[0]))  # float64, exact up to rounding
    scale = 0.0
    for u in updates:
        H, server = server.update(u)
        assert in_range(H)
        if well_scaled({"m": m}, u):  # else float32 m may have underflowed where m does not
            assert float(H) == pytest.approx(np_cosine({"m": m}, u), abs=1e-5)
        m = alpha * m + (1.0 - alpha) * flat(u)
        scale = max(scale, np.abs(flat(u)).max(initial=0.0))
        # float32 rounding, relative to the updates averaged (m may cancel to ~0)
        np.testing.assert_allclose(flat(server.momentum), m, rtol=1e-5, atol=1e-6 * scale)


# ------------------------------------------------------------------------ 2. bounds always hold


@st.composite
def bounds_and_inside(draw):
    """Random valid :class:`Bounds` (some with lower == upper) and a point inside them.

    The bounds span all normal positive float64s: ``exp`` of ``[-708, 709]``.
    """
    pairs = st.lists(st.floats(-708.0, 709.0), min_size=2, max_size=2)
    ends = [sorted(draw(pairs)) for _ in NAMES]
    log_lo, log_hi = np.array(ends).T
    log_hi = np.where(draw(st.booleans()), log_lo, log_hi)  # some with lower == upper
    frac = draw(hnp.arrays(np.float64, 3, elements=st.floats(0, 1)))
    lower, upper = np.exp(log_lo), np.exp(log_hi)
    inside = np.clip(np.exp(log_lo + frac * (log_hi - log_lo)), lower, upper)
    named = [HParams(**dict(zip(NAMES, v.tolist()))) for v in (lower, upper, inside)]
    return Bounds(lower=named[0], upper=named[1]), named[2]


def egn_vectors(bounds: Bounds):
    """``(lower, upper)`` in the order of :data:`NAMES`."""
    sides = (bounds.lower, bounds.upper)
    return tuple(tuple(getattr(side, n) for n in NAMES) for side in sides)


@budget(200)
@given(
    bounds_and_inside(),
    st.lists(st.tuples(UNIT, UNIT), min_size=1, max_size=6),
    st.tuples(RATE, RATE, RATE),
    ALPHA,
    st.floats(-1e3, 1e3),
)
def test_egn_steps_never_leave_the_bounds(b_and_init, hgs, rates, alpha, far):
    bounds, init = b_and_init
    config = FathomConfig(
        init=init,
        bounds=bounds,
        gamma_local_epochs=rates[0],
        gamma_learning_rate=rates[1],
        gamma_batch_size=rates[2],
        alpha=alpha,
    )
    lower, upper = egn_vectors(bounds)
    log_lo, log_hi = np.log(lower), np.log(upper)
    p = log_hparams(init)
    assert np.all((log_lo <= p) & (p <= log_hi))
    for H, G in hgs:
        q = egn_step(p, H, G, config.gamma, lower, upper)
        # the step, worked out independently on p = log(eta, E, B): log eta += g_eta H,
        # log E += g_E (H + G), log B -= g_B G, then clipped
        with np.errstate(over="ignore"):
            unclipped = p + np.array([rates[1], rates[0], rates[2]]) * np.array([H, H + G, -G])
        np.testing.assert_array_equal(q, np.minimum(np.maximum(unclipped, log_lo), log_hi))
        assert np.all(np.isfinite(q)) and np.all((log_lo <= q) & (q <= log_hi))
        hp = bounds.clip(hparams_from_log(q))  # what FathomSampler proposes
        assert bounds.contains(hp)
        assert np.all(np.abs(log_hparams(hp) - q) <= 1e-12 * (1 + np.abs(q)))
        p = q
    # from a p outside the bounds, too
    q = egn_step(p + far, 0.0, 0.0, config.gamma, lower, upper)
    assert np.all((log_lo <= q) & (q <= log_hi))


@given(bounds_and_inside(), st.lists(st.tuples(UNIT, UNIT), min_size=1, max_size=6), st.tuples(RATE, RATE, RATE))
def test_next_hparams_is_numpys_egn_step_bit_for_bit(b_and_init, hgs, rates):
    # next_hparams is egn_step (checked against NumPy arrays above) made hyperparameters:
    # exp of its p, the bound itself where p is on a bound, the used value where gamma is 0.
    bounds, used = b_and_init
    config = FathomConfig(
        init=used, bounds=bounds, gamma_local_epochs=rates[0], gamma_learning_rate=rates[1], gamma_batch_size=rates[2]
    )
    lower, upper = egn_vectors(bounds)
    for H, G in hgs:
        q = egn_step(log_hparams(used), H, G, config.gamma, lower, upper)
        want = []
        for i, name in enumerate(NAMES):
            if config.gamma[i] == 0.0:
                want.append(min(max(getattr(used, name), lower[i]), upper[i]))
            elif q[i] <= np.log(lower[i]):
                want.append(lower[i])
            elif q[i] >= np.log(upper[i]):
                want.append(upper[i])
            else:
                want.append(min(max(float(np.exp(q[i])), lower[i]), upper[i]))
        got = next_hparams(used, H, G, config)
        assert [getattr(got, n) for n in NAMES] == want
        used = got


# ------------------------------------------------------------------------ 3. zeros never give NaN


@budget(40)
@given(scaled_trees(2), ALPHA, st.integers(1, 4))
def test_zero_gradients_and_zero_updates_give_zero_never_nan(tx, alpha, clients):
    x0, m = tx
    zeros = jax.tree_util.tree_map(np.zeros_like, x0)
    # zero gradient, and zero update (params == x0): c_k = 0, not NaN
    tracker = ClientTracker.init(x0).update(zeros, x0)
    assert float(tracker.phi) == 0.0
    assert float(ClientTracker.init(x0).update(m, x0).phi) == 0.0
    # a round where every client's update is zero
    u, G = aggregate_round([zeros] * clients, [0.0] * clients, list(range(1, clients + 1)))
    assert G == 0.0 and not flat(u).any()
    # zero update against any momentum, and any update against zero momentum
    for before in (ServerTracker(momentum=m, alpha=alpha), ServerTracker.init(x0, alpha=alpha)):
        H, after = before.update(u)
        assert float(H) == 0.0 and np.all(np.isfinite(flat(after.momentum)))
    H, _ = ServerTracker.init(x0, alpha=alpha).update(m)
    assert float(H) == 0.0
    np.testing.assert_array_equal(flat(update_momentum(zeros, zeros, alpha)), 0.0)
    # the EGN step does not move at H = G = 0
    p = np.log([0.1, 1.0, 16.0])
    q = egn_step(p, H, G, (0.01, 0.01, 0.1), (1e-3, 0.1, 1.0), (1.0, 10.0, 256.0))
    np.testing.assert_array_equal(q, p)


# --------------------------------------------------------------------- 4. padding changes nothing

CLIENTS, PER_ROUND = 5, 3


@functools.cache
def shared_model(kind: str):
    """One model object per kind, so engines of a kind share compiled programs."""
    if kind == "zero_loss":

        def forward(batch):
            return hk.Linear(NUM_CLASSES)(batch["x"])

        return fedjax.create_model_from_haiku(
            transformed_forward_pass=hk.transform(forward),
            sample_batch={"x": np.zeros((1, FEATURES), np.float32)},
            train_loss=lambda batch, preds: 0.0 * preds[:, 0],
            eval_metrics={"accuracy": fedjax.metrics.Accuracy()},
        )
    return mlp_model(linear_loss=kind == "linear")


def engine(kind: str, sizes, buckets, seed: int) -> Engine:
    task = toy_task(sizes=tuple(sizes), clients_per_round=PER_ROUND, model=shared_model(kind))
    return Engine(
        task,
        seed=seed,
        buckets=buckets,
        client_block=PER_ROUND,
        steps_per_call=1,
        client_statistic=LocalAgreement(),
    )


@st.composite
def round_setup(draw, max_batch: int = 7):
    """A real-valued batch size, and client sizes mostly not multiples of ``B_int``."""
    batch_size = draw(st.floats(1.0, max_batch + 0.49))
    b_int = max(math.floor(batch_size + 0.5), 1)
    sizes = [
        b_int * draw(st.integers(1, 5)) + draw(st.integers(min(1, b_int - 1), b_int - 1))
        for _ in range(CLIENTS)
    ]
    return batch_size, b_int, sizes


@budget(8)
@given(round_setup(), st.floats(0.01, 0.5), st.floats(0.2, 2.0), st.integers(0, 3))
def test_padding_a_batch_to_a_bigger_bucket_never_changes_the_round(setup, eta, epochs, seed):
    batch_size, b_int, sizes = setup
    padded_ladder = tuple(b for b in default_buckets(256) if b > b_int)  # the next bucket up
    note(f"B_int={b_int} padded to {padded_ladder[0]}, sizes={sizes}")
    hp = HParams(learning_rate=eta, local_epochs=epochs, batch_size=batch_size)
    exact = engine("mlp", sizes, (b_int, 256), seed)
    padded = engine("mlp", sizes, padded_ladder, seed)
    assert bucket_size(b_int, exact.buckets) == b_int < bucket_size(b_int, padded.buckets)
    state = exact.init()
    s_exact, r_exact = exact.run_round(state, hp)
    s_padded, r_padded = padded.run_round(state, hp)

    n = r_exact.num_examples
    assert list(r_exact.local_steps) == [max(math.ceil(epochs * k / b_int), 1) for k in n]
    np.testing.assert_array_equal(r_padded.local_steps, r_exact.local_steps)
    assert r_padded.cost == dataclasses.replace(r_exact.cost, seconds=r_padded.cost.seconds)
    assert r_exact.finite and r_padded.finite
    assert r_padded.train_loss == pytest.approx(r_exact.train_loss, rel=1e-5)
    np.testing.assert_allclose(r_padded.client_loss, r_exact.client_loss, rtol=1e-5)
    np.testing.assert_allclose(r_padded.statistic, r_exact.statistic, atol=1e-5)
    # float32 sums in another order: the update (x0 - x_K) and an element that cancels
    # (e.g. -0.0133 from terms of 0.25) carry the rounding of the parameters' scale, not
    # their own; a padded example counted would move the update by about 1 / B_int of its size.
    scale = float(np.abs(flat(s_exact.params)).max())
    for got, want in ((r_padded.update, r_exact.update), (s_padded.params, s_exact.params)):
        np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=2e-6 * scale)


@budget(6)
@given(round_setup(), st.floats(0.01, 1.0), st.integers(0, 3))
def test_every_step_averages_exactly_b_real_examples(setup, eta, seed):
    # A loss linear in the parameters, -0.1 * logit_y, has the constant per-example
    # gradient g_j = -0.1 (x_j e_y^T, e_y). With E = B / gcd(B, n_1, ..., n_m), each
    # client runs K_i = E n_i / B steps and uses each of its examples exactly E times
    # (the shuffled passes straddle step boundaries when B does not divide n_i), so
    # Delta_i = eta E / B * sum_j g_j whatever the shuffle and whatever the padding.
    batch_size, b_int, sizes = setup
    epochs = b_int // math.gcd(b_int, *sizes)
    eng = engine("linear", sizes, (8, 256), seed)  # every B_int <= 7 pads to 8
    state = eng.init()
    hp = HParams(learning_rate=eta, local_epochs=float(epochs), batch_size=batch_size)
    _, res = eng.run_round(state, hp)

    n = res.num_examples
    assert list(res.local_steps) == [epochs * k // b_int for k in n]
    assert res.cost.examples == epochs * int(n.sum())
    u = {"b": np.zeros(NUM_CLASSES), "w": np.zeros((FEATURES, NUM_CLASSES))}
    for cid, n_i in zip(res.client_ids, n):
        ex = eng.task.train.get_client(cid).all_examples()
        onehot = np.eye(NUM_CLASSES)[ex["y"]]
        scale = (n_i / n.sum()) * eta * epochs / b_int * -0.1
        u["b"] += scale * onehot.sum(0)
        u["w"] += scale * np.asarray(ex["x"], np.float64).T @ onehot
    got = res.update["linear"]
    np.testing.assert_allclose(np.asarray(got["b"]), u["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["w"]), u["w"], rtol=1e-5, atol=1e-6)


@budget(4)
@given(round_setup(), st.floats(0.01, 1.0), st.floats(0.2, 2.0))
def test_a_round_of_zero_gradients_gives_zeros_never_nan(setup, eta, epochs):
    batch_size, _, sizes = setup
    eng = engine("zero_loss", sizes, (8, 256), 0)
    state = eng.init()
    hp = HParams(learning_rate=eta, local_epochs=epochs, batch_size=batch_size)
    new, res = eng.run_round(state, hp)
    assert res.finite and res.train_loss == 0.0
    np.testing.assert_array_equal(res.statistic, 0.0)  # cos(0, 0) = 0 at every step
    G = local_hypergradient(res.statistic, res.num_examples)
    assert G == 0.0
    assert not flat(res.update).any()
    np.testing.assert_array_equal(flat(new.params), flat(state.params))
    H, server = ServerTracker.init(state.params, alpha=0.5).update(res.update)
    assert float(H) == 0.0 and not flat(server.momentum).any()
    p = log_hparams(res.hparams)
    lower, upper = egn_vectors(eng.task.bounds)
    q = egn_step(p, H, G, (0.01, 0.01, 0.1), lower, upper)
    np.testing.assert_array_equal(q, p)
