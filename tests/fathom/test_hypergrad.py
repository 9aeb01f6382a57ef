"""Tests of fathom_tune.fathom.hypergrad and .state: numbers worked out by hand, and an
independent NumPy re-implementation on a two-client toy problem."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_tune.fathom.hypergrad import (
    ClientTracker,
    ServerTracker,
    aggregate_round,
    client_cosine,
    global_hypergradient,
    local_hypergradient,
    safe_cosine,
    update_momentum,
)
from fathom_tune.fathom.state import FathomConfig, egn_step, hparams_from_log, log_hparams
from fathom_tune.hparams import NAMES, Bounds, HParams

GAMMA = (0.01, 0.01, 0.1)  # (gamma_eta, gamma_E, gamma_B), the paper's
WIDE_LOWER = (1e-6, 1e-3, 1e-3)  # (eta, E, B)
WIDE_UPPER = (1e3, 1e3, 1e6)


# --------------------------------------------------------------------------- safe_cosine


def test_safe_cosine_by_hand_over_a_pytree():
    # a = (3, 4) split over two leaves, b = (4, 3): <a,b> = 12 + 12 = 24,
    # |a| = |b| = 5, cos = 24 / 25 = 0.96.
    a = {"w": jnp.array([3.0]), "b": jnp.array(4.0)}
    b = {"w": jnp.array([4.0]), "b": jnp.array(3.0)}
    assert float(safe_cosine(a, b)) == pytest.approx(0.96, rel=1e-6)
    # opposite directions: -1; orthogonal: 0
    assert float(safe_cosine(a, jax.tree_util.tree_map(lambda x: -2.0 * x, a))) == -1.0
    assert float(safe_cosine(jnp.array([1.0, 0.0]), jnp.array([0.0, 5.0]))) == 0.0


@pytest.mark.parametrize(
    "a, b",
    [
        (np.zeros(3), np.array([1.0, 2.0, 3.0])),  # zero gradient
        (np.array([1.0, 2.0, 3.0]), np.zeros(3)),  # zero update
        (np.zeros(3), np.zeros(3)),
        (np.array([1e30, 1e30], np.float32), np.array([1.0, 1.0], np.float32)),  # |a|^2 overflows
    ],
    ids=["zero-a", "zero-b", "both-zero", "overflow"],
)
def test_safe_cosine_is_zero_where_undefined(a, b):
    assert float(safe_cosine(a, b)) == 0.0


def test_safe_cosine_gradient_is_finite_at_zero():
    b = jnp.array([1.0, -2.0])
    for a in (jnp.zeros(2), jnp.array([0.5, 0.25])):
        ga, gb = jax.grad(safe_cosine, argnums=(0, 1))(a, b)
        assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    ga = jax.grad(safe_cosine)(jnp.zeros(2), jnp.zeros(2))
    assert np.all(np.isfinite(ga))


def test_safe_cosine_stays_in_range():
    # Parallel vectors whose float32 rounding could push the ratio past 1.
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.normal(size=17).astype(np.float32)
        c = float(safe_cosine(a, np.float32(3.7) * a))
        assert -1.0 <= c <= 1.0 and c == pytest.approx(1.0, abs=1e-6)
        assert -1.0 <= float(safe_cosine(a, -a)) <= 1.0


def test_safe_cosine_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32).at[2].set(0.0)
    batched = jax.jit(jax.vmap(safe_cosine))(a, b)
    expected = [float(safe_cosine(x, y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(np.asarray(batched), expected, rtol=1e-6, atol=1e-7)
    assert float(batched[2]) == 0.0


def test_safe_cosine_under_strict_dtype_promotion():
    a = {"w": jnp.ones(3, jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
    b = {"w": jnp.ones(3, jnp.float32), "h": -jnp.ones(2, jnp.bfloat16)}
    with jax.numpy_dtype_promotion("strict"):
        c = safe_cosine(a, b)  # (3 - 2) / 5 = 0.2
        tracker = ClientTracker.init(a).update(b, a)  # update x0 - x = 0: phi = min(1, 0)
    assert c.dtype == jnp.float32 and float(c) == pytest.approx(0.2, rel=1e-6)
    assert float(tracker.phi) == 0.0


def test_safe_cosine_rejects_mismatched_pytrees():
    with pytest.raises(ValueError, match="structure"):
        safe_cosine({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
    with pytest.raises(ValueError, match="shapes"):
        safe_cosine(jnp.ones(2), jnp.ones(3))


# --------------------------------------------------------------------------- client side


def test_client_phi_by_hand():
    # x0 = (1, 1), eta = 0.5.
    # k=0: g0 = (1, 0), x1 = (0.5, 1),   d0 = x0 - x1 = (0.5, 0):   c0 = 1
    # k=1: g1 = (0, 1), x2 = (0.5, 0.5), d1 = (0.5, 0.5): c1 = 0.5 / (1 * sqrt(0.5)) = 1/sqrt(2)
    x = np.array([1.0, 1.0])
    tracker = ClientTracker.init(x)
    assert float(tracker.phi) == 1.0  # phi starts at +1
    for g in (np.array([1.0, 0.0]), np.array([0.0, 1.0])):
        x = x - 0.5 * g
        tracker = tracker.update(g, x)
    assert float(tracker.phi) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert float(client_cosine(np.array([0.0, 1.0]), np.array([0.5, 0.5]))) == pytest.approx(
        1 / math.sqrt(2), rel=1e-6
    )


def test_one_local_step_gives_phi_one():
    # d0 = eta * g0 is parallel to g0, so c0 = 1 whatever g0 is.
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=6)
    g0 = rng.normal(size=6)
    tracker = ClientTracker.init(x0).update(g0, x0 - 0.03 * g0)
    assert float(tracker.phi) == pytest.approx(1.0, abs=1e-6)


def test_zero_gradient_step_gives_phi_zero():
    # g_k = 0 makes c_k = 0 (not NaN): phi = min(1, 1, 0) = 0.
    x0 = np.array([2.0, 0.0])
    tracker = ClientTracker.init(x0)
    x1 = x0 - 0.1 * np.array([1.0, 0.0])
    tracker = tracker.update(np.array([1.0, 0.0]), x1)
    tracker = tracker.update(np.zeros(2), x1)
    assert float(tracker.phi) == 0.0


def test_client_tracker_in_a_jitted_scan():
    # f(x) = 0.5 |x - c|^2 with a different c per step; the scan carries the tracker.
    cs = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    eta = 0.5

    @jax.jit
    def run(x0):
        def body(carry, c):
            x, tracker = carry
            g = x - c
            x = x - eta * g
            return (x, tracker.update(g, x)), None

        (x, tracker), _ = jax.lax.scan(body, (x0, ClientTracker.init(x0)), cs)
        return x, tracker.phi

    x, phi = run(jnp.zeros(2))
    # the same in NumPy
    xs, cos = np.zeros(2), []
    for c in np.asarray(cs):
        g = xs - c
        xs = xs - eta * g
        d = -xs
        cos.append(g @ d / (np.linalg.norm(g) * np.linalg.norm(d)))
    np.testing.assert_allclose(np.asarray(x), xs, rtol=1e-6)
    assert float(phi) == pytest.approx(min(cos), rel=1e-5)


# --------------------------------------------------------------------------- server side


def test_local_hypergradient_by_hand():
    # w = (30, 10) / 40 = (0.75, 0.25); G = 0.75 * 1 + 0.25 * 0.5 = 0.875
    assert float(local_hypergradient([1.0, 0.5], [30, 10])) == pytest.approx(0.875, rel=1e-6)
    # all phi = 1 gives exactly 1 (clamped against rounding in the weights)
    assert float(local_hypergradient(jnp.ones(7), [3, 5, 7, 11, 13, 17, 19])) <= 1.0
    with pytest.raises(ValueError, match="same length"):
        local_hypergradient([1.0, 0.5], [1, 2, 3])


def test_global_hypergradient_and_momentum_by_hand():
    m = jnp.zeros(2)
    u1 = jnp.array([2.0, 0.0])
    assert float(global_hypergradient(m, u1)) == 0.0  # round 1: m = 0 -> H = 0
    m = update_momentum(m, u1, 0.5)  # 0.5 * 0 + 0.5 * (2, 0) = (1, 0)
    np.testing.assert_allclose(np.asarray(m), [1.0, 0.0])
    u2 = jnp.array([1.0, 1.0])
    # H = cos((1, 0), (1, 1)) = 1 / sqrt(2), with the m from *before* round 2
    assert float(global_hypergradient(m, u2)) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    m = update_momentum(m, u2, 0.5)  # 0.5 * (1, 0) + 0.5 * (1, 1) = (1, 0.5)
    np.testing.assert_allclose(np.asarray(m), [1.0, 0.5])
    # pytrees and alpha = 0 (m = u)
    tree = update_momentum({"a": jnp.ones(2)}, {"a": jnp.full(2, 3.0)}, 0.0)
    np.testing.assert_allclose(np.asarray(tree["a"]), [3.0, 3.0])


def test_aggregate_round_by_hand():
    # w = (1, 3) / 4; u = 0.25 * 1 + 0.75 * 3 = 2.5; G = 0.25 * 1 + 0.75 * 0.5 = 0.625
    u, G = aggregate_round([{"w": np.array([1.0])}, {"w": np.array([3.0])}], [1.0, 0.5], [1, 3])
    np.testing.assert_allclose(np.asarray(u["w"]), [2.5])
    assert float(G) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="one of each per client"):
        aggregate_round([np.ones(1)], [1.0], [1, 2])


def test_server_tracker_zero_update_gives_h_zero():
    server = ServerTracker.init(np.zeros(2), alpha=0.5)
    H, server = server.update(np.array([1.0, 0.0]))
    H, server = server.update(np.zeros(2))  # zero update: H = 0
    assert float(H) == 0.0


# --------------------------------------------------------------------------- two-client toy problem


# Client i has the loss f_i(x) = 0.5 (x - c_i)^T A_i (x - c_i) and takes full
# gradient steps, K_i of them.
TOY = [
    {"A": np.diag([1.0, 2.0]), "c": np.array([1.0, 1.0]), "n": 3, "K": 2},
    {"A": np.eye(2), "c": np.array([-1.0, 0.0]), "n": 1, "K": 1},
]


def test_toy_round_one_by_hand():
    # eta = 0.5, x0 = (0, 0).
    # Client 1 (A = diag(1, 2), c = (1, 1), K = 2):
    #   k=0: g0 = A (x0 - c) = (-1, -2), x1 = x0 - 0.5 g0 = (0.5, 1), d0 = (-0.5, -1): c0 = 1
    #   k=1: g1 = A (x1 - c) = (-0.5, 0), x2 = (0.75, 1), d1 = (-0.75, -1):
    #        c1 = <g1, d1> / (|g1| |d1|) = 0.375 / (0.5 * 1.25) = 0.6
    #   phi_1 = 0.6, Delta_1 = x0 - x2 = (-0.75, -1)
    # Client 2 (A = I, c = (-1, 0), K = 1): g0 = (1, 0), x1 = (-0.5, 0), phi_2 = 1,
    #   Delta_2 = (0.5, 0)
    # w = (3, 1) / 4 = (0.75, 0.25)
    #   G = 0.75 * 0.6 + 0.25 * 1 = 0.7
    #   u = 0.75 (-0.75, -1) + 0.25 (0.5, 0) = (-0.4375, -0.75)
    # H = cos(m = 0, u) = 0; m <- 0.5 * 0 + 0.5 u = (-0.21875, -0.375)
    # EGN on p = log(eta, E, B), gamma = (0.01, 0.01, 0.1):
    #   dp = (0.01 * 0, 0.01 (0 + 0.7), -0.1 * 0.7) = (0, 0.007, -0.07)
    eta, x0 = 0.5, np.zeros(2)
    deltas, phis = [], []
    for client in TOY:
        x, tracker = x0, ClientTracker.init(x0)
        for _ in range(client["K"]):
            g = client["A"] @ (x - client["c"])
            x = x - eta * g
            tracker = tracker.update(g, x)
        deltas.append(x0 - x)
        phis.append(tracker.phi)
    assert [float(p) for p in phis] == pytest.approx([0.6, 1.0], rel=1e-6)
    u, G = aggregate_round(deltas, phis, [c["n"] for c in TOY])
    assert float(G) == pytest.approx(0.7, rel=1e-6)
    np.testing.assert_allclose(np.asarray(u), [-0.4375, -0.75], rtol=1e-6)
    H, server = ServerTracker.init(x0, alpha=0.5).update(u)
    assert float(H) == 0.0
    np.testing.assert_allclose(np.asarray(server.momentum), [-0.21875, -0.375], rtol=1e-6)
    p = np.log([eta, 1.0, 2.0])
    q = egn_step(p, H, G, GAMMA, WIDE_LOWER, WIDE_UPPER)
    np.testing.assert_allclose(q - p, [0.0, 0.007, -0.07], atol=1e-7)


def _numpy_reference(num_rounds: int, hp0):
    """FATHOM on TOY, written independently in NumPy float64 (no fathom_tune)."""

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    eta, E, B = hp0
    x, m = np.zeros(2), np.zeros(2)
    out = []
    for _ in range(num_rounds):
        deltas, phis = [], []
        for client in TOY:
            xk, phi = x.copy(), 1.0
            for _ in range(client["K"]):
                g = client["A"] @ (xk - client["c"])
                xk = xk - eta * g
                phi = min(phi, cos(g, x - xk))
            deltas.append(x - xk)
            phis.append(phi)
        w = np.array([c["n"] for c in TOY], float)
        w /= w.sum()
        u = w[0] * deltas[0] + w[1] * deltas[1]
        G = float(w @ np.array(phis))
        H = cos(m, u)
        m = 0.5 * m + 0.5 * u
        x = x - u
        E *= math.exp(0.01 * (H + G))
        eta *= math.exp(0.01 * H)
        B *= math.exp(-0.1 * G)
        out.append({"G": G, "H": H, "x": x.copy(), "next": (eta, E, B)})
    return out


def test_toy_two_rounds_match_independent_numpy():
    hp = (0.5, 1.0, 2.0)  # (eta, E, B)
    reference = _numpy_reference(2, hp)
    x = np.zeros(2)
    server = ServerTracker.init(x, alpha=0.5)
    p = np.log(hp)
    for expected in reference:
        eta = math.exp(p[0])
        deltas, phis = [], []
        for client in TOY:
            xk, tracker = x, ClientTracker.init(x)
            for _ in range(client["K"]):
                g = client["A"] @ (xk - client["c"])
                xk = xk - eta * g
                tracker = tracker.update(g, xk)
            deltas.append(x - xk)
            phis.append(tracker.phi)
        u, G = aggregate_round(deltas, phis, [c["n"] for c in TOY])
        H, server = server.update(u)
        x = x - np.asarray(u, np.float64)
        p = egn_step(p, H, G, GAMMA, WIDE_LOWER, WIDE_UPPER)
        assert float(G) == pytest.approx(expected["G"], rel=1e-5)
        assert float(H) == pytest.approx(expected["H"], rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(x, expected["x"], rtol=1e-5)
        np.testing.assert_allclose(np.exp(p), expected["next"], rtol=1e-5)
    assert reference[1]["H"] > 0.9  # round 2 moves along round 1: H > 0, eta grows


# --------------------------------------------------------------------------- egn_step


def test_egn_step_by_hand():
    # p = log(eta, E, B) = log(0.1, 1, 20), H = 0.5, G = 0.8:
    # dlog eta = 0.01 * 0.5 = 0.005; dlog E = 0.01 (0.5 + 0.8) = 0.013; dlog B = -0.1 * 0.8 = -0.08
    p = np.log([0.1, 1.0, 20.0])
    q = egn_step(p, 0.5, 0.8, GAMMA, (1e-3, 0.1, 1.0), (1.0, 10.0, 256.0))
    np.testing.assert_allclose(q - p, [0.005, 0.013, -0.08], atol=1e-12)
    assert q.dtype == np.float64
    # a rate of 0 freezes that hyperparameter
    q = egn_step(p, 0.5, 0.8, (0.01, 0.0, 0.0), (1e-3, 0.1, 1.0), (1.0, 10.0, 256.0))
    np.testing.assert_allclose(q - p, [0.005, 0.0, 0.0], atol=1e-12)


def test_egn_step_clips_p_without_wind_up_at_the_upper_bound():
    lower, upper = (1e-3, 0.1, 1.0), (1.0, 1.0, 256.0)
    p = np.log([0.5, 1.0, 20.0])  # E already at its upper bound 1.0
    for _ in range(5):  # pushes up: H + G = 1.5 each time, would be +0.075 unclipped
        p = egn_step(p, 0.5, 1.0, GAMMA, lower, upper)
    assert p[1] == 0.0  # clipped at log 1
    # one step back: H + G = -0.2 -> log E = 0 - 0.002, below the bound at once
    p = egn_step(p, -0.2, 0.0, GAMMA, lower, upper)
    assert p[1] == pytest.approx(-0.002, abs=1e-15)


def test_egn_step_clips_p_at_lower_bounds():
    lower, upper = (1e-3, 0.5, 16.0), (1.0, 10.0, 256.0)
    p = np.log([1e-3, 0.5, 16.0])  # every value at its lower bound
    # H = -1, G = 1: dlog eta = -0.01, dlog E = 0, dlog B = -0.1: eta, B pushed down
    for _ in range(3):
        p = egn_step(p, -1.0, 1.0, GAMMA, lower, upper)
    np.testing.assert_allclose(p, np.log([1e-3, 0.5, 16.0]), rtol=0, atol=1e-15)
    # G = -0.5, H = 0.5: log eta += 0.005 and log B += 0.05 from the bound at once
    q = egn_step(p, 0.5, -0.5, GAMMA, lower, upper)
    np.testing.assert_allclose(q - p, [0.005, 0.0, 0.05], atol=1e-12)


def test_egn_step_validates():
    p = np.zeros(3)
    with pytest.raises(ValueError, match=r"p must have shape \(3,\)"):
        egn_step(np.zeros(2), 0.0, 0.0, GAMMA, WIDE_LOWER, WIDE_UPPER)
    with pytest.raises(ValueError, match="H must be finite"):
        egn_step(p, float("nan"), 0.0, GAMMA, WIDE_LOWER, WIDE_UPPER)
    with pytest.raises(ValueError, match="lower <= upper"):
        egn_step(p, 0.0, 0.0, GAMMA, (1.0, 1.0, 1.0), (0.5, 2.0, 2.0))


def test_log_vector_order_and_round_trip():
    assert NAMES == ("learning_rate", "local_epochs", "batch_size")
    hp = HParams(learning_rate=0.1, local_epochs=2.0, batch_size=32.0)
    np.testing.assert_allclose(log_hparams(hp), np.log([0.1, 2.0, 32.0]))
    back = hparams_from_log(log_hparams(hp))
    assert back.as_dict() == pytest.approx(hp.as_dict(), rel=1e-15)


# --------------------------------------------------------------------------- FathomConfig

BOUNDS = Bounds(lower=HParams(1e-3, 0.1, 1.0), upper=HParams(1.0, 10.0, 256.0))


def test_fathom_config_defaults_are_the_papers():
    config = FathomConfig()
    assert (config.init, config.bounds) == (None, None)
    assert config.gamma == (0.01, 0.01, 0.1)
    assert config.alpha == 0.5
    with pytest.raises(TypeError):
        FathomConfig(None, None)  # keyword-only


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("gamma_local_epochs", -0.1, ">= 0"),
        ("gamma_learning_rate", float("inf"), ">= 0"),
        ("gamma_batch_size", float("nan"), ">= 0"),
        ("alpha", 1.0, "[0, 1)"),
        ("alpha", -0.5, ">= 0"),
    ],
)
def test_fathom_config_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError) as info:
        FathomConfig(**{field: value})
    message = str(info.value)
    assert field in message and repr(float(value)) in message and allowed in message


def test_fathom_config_checks_init_against_bounds_and_types():
    FathomConfig(init=HParams(0.1, 1.0, 20.0), bounds=BOUNDS)
    with pytest.raises(ValueError, match=r"FathomConfig.init.learning_rate=2.0 is outside"):
        FathomConfig(init=HParams(2.0, 1.0, 20.0), bounds=BOUNDS)
    FathomConfig(init=HParams(2.0, 1.0, 20.0))  # no bounds: nothing to check against
    with pytest.raises(TypeError, match="FathomConfig.init"):
        FathomConfig(init={"learning_rate": 0.1})
    with pytest.raises(TypeError, match="FathomConfig.gamma_batch_size"):
        FathomConfig(gamma_batch_size="0.1")


# --------------------------------------------------------------------------- track_agreement


def test_track_agreement_computes_h_and_m_in_the_engines_round():
    """An engine whose server optimizer is track_agreement(sgd(1), alpha): the same
    model as plain FedAvg, bit for bit, and H, m as worked out here in NumPy from the
    rounds' updates u_t = x_t - x_{t+1}."""
    import optax

    import fathom_tune
    from fathom_tune.engine import FEDAVG_SERVER, Engine
    from fathom_tune.fathom.hypergrad import TrackedState, track_agreement

    task = fathom_tune.tasks.digits()
    alpha = 0.7
    plain, tracked = Engine(task), Engine(task, server_optimizer=track_agreement(FEDAVG_SERVER, alpha))
    a, b = plain.init(), tracked.init()
    assert isinstance(b.opt_state, TrackedState) and float(b.opt_state.h) == 0.0
    m = np.zeros(sum(x.size for x in jax.tree_util.tree_leaves(a.params)))

    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])

    for _ in range(3):
        before = flat(b.params)
        a, _ = plain.run_round(a, task.init_hparams)
        b, result = tracked.run_round(b, task.init_hparams)
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        u = before - flat(b.params)  # sgd(1.0): x <- x - u
        norms = np.linalg.norm(m) * np.linalg.norm(u)
        expected_h = 0.0 if norms == 0 else float(m @ u / norms)
        m = alpha * m + (1 - alpha) * u
        assert float(result.opt_state.h) == pytest.approx(expected_h, abs=2e-5)
        np.testing.assert_allclose(flat(b.opt_state.momentum), m, rtol=1e-4, atol=1e-7)
    assert expected_h > 0.5  # the check reached a non-trivial H
    # One object per (inner, alpha): engines share compiled programs.
    assert track_agreement(FEDAVG_SERVER, alpha) is track_agreement(FEDAVG_SERVER, alpha)
    assert track_agreement(FEDAVG_SERVER, alpha) is not track_agreement(optax.sgd(1.0), alpha)
    with pytest.raises(ValueError, match="alpha"):
        track_agreement(FEDAVG_SERVER, 1.0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        track_agreement("sgd", 0.5)
