"""Round time of the engine against FedJAX's own ``fed_avg`` on identical data.

Run: python -m pytest tests/benchmarks -o addopts="" --benchmark-columns=mean,stddev,rounds

Each pair of benchmarks shares a group; BENCHMARKS.md reports the ratio of
the means (FedJAX / engine; above 1 means the engine is faster).
"""

import functools
import os

import fedjax
import jax
import numpy as np
import pytest
from fedjax.algorithms import fed_avg

import fathom_tune
from fathom_tune import Bounds, HParams, Target, Task
from fathom_tune.engine import Engine, bucket_size
from fathom_tune.engine.xla_options import compiler_options as engine_compiler_options

ROUNDS = 5


def emnist_shaped_task(num_clients=10, examples=200):
    """FedJAX's EMNIST conv model on 10 clients x 200 examples of EMNIST shape (random pixels)."""
    rng = np.random.default_rng(0)
    data = {
        f"c{i}".encode(): {
            "x": rng.random((examples, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, 62, examples).astype(np.int32),
        }
        for i in range(num_clients)
    }
    fd = fedjax.InMemoryFederatedData(data)
    return Task(
        name="emnist-shaped",
        train=fd,
        validation=fd,
        test=fd,
        model=fedjax.models.emnist.create_conv_model(only_digits=False),
        clients_per_round=num_clients,
        num_rounds=10,
        eval_every=10,
        target=Target("accuracy", 0.5),
        init_hparams=HParams(0.1, 1.0, 20.0),
        bounds=Bounds(HParams(1e-4, 0.01, 1.0), HParams(10.0, 10.0, 256.0)),
    )


def fedjax_round(task, hparams, seed=0):
    """A closure running one FedJAX ``fed_avg`` round on the engine's round-0 clients."""
    model = task.model
    algorithm = fed_avg.federated_averaging(
        fedjax.model_grad(model),
        fedjax.optimizers.sgd(hparams.learning_rate),
        fedjax.optimizers.sgd(1.0),
        fedjax.ShuffleRepeatBatchHParams(batch_size=hparams.batch_int, num_epochs=1),
    )
    engine = Engine(task, seed=seed)
    _, res = engine.run_round(engine.init(), hparams)
    clients = [(cid, task.train.get_client(cid), jax.random.PRNGKey(i)) for i, cid in enumerate(res.client_ids)]
    state = [algorithm.init(model.init(jax.random.PRNGKey(seed)))]

    def step():
        state[0], _ = algorithm.apply(state[0], clients)
        jax.block_until_ready(state[0].params)

    return step


def engine_round(task, hparams, seed=0, advance=False, **kwargs):
    """A closure running one engine round: the same round (same clients) every time,
    like the FedJAX closure, or with ``advance`` consecutive rounds, as a run does."""
    engine = Engine(task, seed=seed, **kwargs)
    state = [engine.init()]

    def step():
        s, _ = engine.run_round(state[0], hparams)
        if advance:
            state[0] = s
        jax.block_until_ready(s.params)

    return step


CASES = {
    "digits": (lambda: fathom_tune.tasks.digits(), HParams(0.1, 1.0, 20.0)),
    "emnist_conv": (emnist_shaped_task, HParams(0.1, 1.0, 20.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, hparams = CASES[request.param]
    return request.param, make(), hparams


@pytest.mark.parametrize("impl", ["fedjax_fed_avg", "engine"])
def test_round_time(benchmark, case, impl):
    name, task, hparams = case
    step = (fedjax_round if impl == "fedjax_fed_avg" else engine_round)(task, hparams)
    step()  # compile
    benchmark.group = f"round time: {name}"
    benchmark.extra_info.update(task=name, impl=impl, backend=jax.default_backend())
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)


SWEEP_CASES = {
    # digits: clients vmapped, the default ladder; conv: one client per device on
    # XLA:CPU, the close ladder (fine_buckets).
    "digits": lambda: fathom_tune.tasks.digits(),
    "emnist_conv": lambda: emnist_shaped_task(num_clients=2, examples=60),
}


@pytest.mark.parametrize("name", sorted(SWEEP_CASES))
def test_batch_size_sweep_compilations(benchmark, name):
    """Compiled programs when B drifts from 4 to 256 over 40 rounds."""
    import time

    task = SWEEP_CASES[name]()
    engine = Engine(task, seed=0)

    def sweep():
        state = engine.init()
        t = time.perf_counter()
        for b in np.geomspace(4, 256, 40):
            state, _ = engine.run_round(state, HParams(0.1, 1.0, float(b)))
        return engine.compile_counts, time.perf_counter() - t

    counts, seconds = benchmark.pedantic(sweep, rounds=1, iterations=1)
    benchmark.extra_info.update(counts, seconds=seconds, buckets=len(engine.buckets), backend=jax.default_backend())
    benchmark.group = "compilations"
    print(f"\n{name}: {counts}, {seconds:.1f} s")
    bound = 13 if name == "digits" else 69
    assert counts["local_steps"] <= bound


# ---------------------------------------------------------------------------
# The compute floor (conv model) and dispatch-bound rounds, ratios in one run.

REPEATS = int(os.environ.get("ENGINE_BENCH_REPEATS", "3"))


def interleaved(fns: dict, repeats: int = REPEATS, best: dict | None = None, runs: dict | None = None) -> dict:
    """Median seconds of each closure, run in turn ``repeats`` times (drift hits all alike).

    The order rotates each repetition, so no case always runs right after the same
    other case (whatever one leaves behind, in caches or in the machine's state,
    falls on each case in turn). ``best``, if given, receives each closure's
    fastest time: on a shared 2-vCPU machine single repetitions of the same
    closure were seen 2.7-3.8 s apart, and the minimum is the least disturbed.
    ``runs``, if given, receives every repetition's time (for ratios within a
    repetition, whose closures ran next to each other)."""
    import statistics
    import time

    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[k]
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    if best is not None:
        best.update({k: min(v) for k, v in times.items()})
    if runs is not None:
        runs.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def plain_sgd_floor(task, hparams, steps: int, compiler_options=None):
    """A closure running ``steps`` plain jitted SGD steps of the model at batch size B:
    no masks, no statistic, no padding (the compute floor of a round with that many steps).

    ``compiler_options`` as for ``jax.jit``: the engine's (the floor of the same
    compiled code) or None (XLA's defaults, as FedJAX's ``fed_avg`` compiles)."""
    model = task.model
    b = hparams.batch_int
    cid = next(iter(task.train.client_ids()))
    ex = task.train.get_client(cid).all_examples()
    batch = {k: jax.numpy.asarray(np.resize(v, (b,) + v.shape[1:])) for k, v in ex.items()}
    eta = hparams.learning_rate

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(params, key):
        def loss(p):
            return jax.numpy.mean(model.train_loss(batch, model.apply_for_train(p, batch, key)))

        g = jax.grad(loss)(params)
        return jax.tree_util.tree_map(lambda p, gi: p - eta * gi, params, g)

    params = model.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    jax.block_until_ready(step(params, key))

    def run():
        p = params
        for _ in range(steps):
            p = step(p, key)
        jax.block_until_ready(p)

    return run


CONV_BATCHES = [8, 16, 20, 32, 50, 64]


@pytest.mark.parametrize("b", CONV_BATCHES)
def test_conv_round_against_compute_floor(benchmark, b):
    """EMNIST conv model, 10 clients x 200 examples: FedJAX, the engine (static and with
    FATHOM's statistic) and the compute floor, interleaved; ratios in ``extra_info``."""
    from fathom_tune.fathom import LocalAgreement

    task = emnist_shaped_task()
    hp = HParams(0.05, 1.0, float(b))
    steps = task.clients_per_round * hp.local_steps(200)
    fns = {
        "fedjax": fedjax_round(task, hp),
        "engine": engine_round(task, hp),
        "engine_phi": engine_round(task, hp, client_statistic=LocalAgreement()),
        "floor": plain_sgd_floor(task, hp, steps, engine_compiler_options(jax.local_devices()[:1])),
        "floor_xla_defaults": plain_sgd_floor(task, hp, steps),
    }
    for fn in fns.values():
        fn()  # compile
    best, runs = {}, {}
    med = benchmark.pedantic(lambda: interleaved(fns, best=best, runs=runs), rounds=1, iterations=1)

    def paired(a, b):
        """The median over repetitions of a / b within each repetition."""
        return float(np.median(np.array(runs[a]) / np.array(runs[b])))

    engine = Engine(task, seed=0)
    info = {f"{k}_s": v for k, v in med.items()}
    info.update(
        batch=b,
        bucket=bucket_size(b, engine.buckets),
        engine_over_floor=med["engine"] / med["floor"],
        engine_phi_over_floor=med["engine_phi"] / med["floor"],
        fedjax_over_engine=med["fedjax"] / med["engine"],
        floor_xla_defaults_over_floor=med["floor_xla_defaults"] / med["floor"],
        best_engine_over_floor=best["engine"] / best["floor"],
        best_engine_phi_over_floor=best["engine_phi"] / best["floor"],
        best_fedjax_over_engine=best["fedjax"] / best["engine"],
        paired_engine_over_floor=paired("engine", "floor"),
        paired_engine_phi_over_floor=paired("engine_phi", "floor"),
        paired_fedjax_over_engine=paired("fedjax", "engine"),
        backend=jax.default_backend(),
    )
    benchmark.group = "conv round vs compute floor"
    benchmark.extra_info.update(info)
    print(f"\nconv B={b}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


DISPATCH_CASES = {
    "digits": (lambda: fathom_tune.tasks.digits(), HParams(0.1, 1.0, 20.0)),
    "synthetic": (lambda: fathom_tune.tasks.synthetic(), HParams(0.1, 1.0, 20.0)),
}


@pytest.mark.parametrize("name", sorted(DISPATCH_CASES))
def test_dispatch_bound_round(benchmark, name):
    """FedJAX's round against the engine's on the small models, interleaved, 200 rounds each
    (the engine runs consecutive rounds, as in a run; FedJAX repeats its round-0 clients)."""
    from fathom_tune.fathom import LocalAgreement

    task = DISPATCH_CASES[name][0]()
    hp = DISPATCH_CASES[name][1]
    closures = {
        "fedjax": fedjax_round(task, hp),
        "engine": engine_round(task, hp, advance=True),
        "engine_phi": engine_round(task, hp, advance=True, client_statistic=LocalAgreement()),
        "engine_host_gather": engine_round(task, hp, advance=True, resident_bytes=1),
    }
    for fn in closures.values():
        fn()

    def many(fn, n=200):
        return lambda: [fn() for _ in range(n)]

    med = benchmark.pedantic(
        lambda: interleaved({k: many(f) for k, f in closures.items()}, repeats=5), rounds=1, iterations=1
    )
    info = {f"{k}_ms": v / 200 * 1e3 for k, v in med.items()}
    info.update(
        fedjax_over_engine=med["fedjax"] / med["engine"],
        fedjax_over_engine_phi=med["fedjax"] / med["engine_phi"],
        backend=jax.default_backend(),
        devices=len(jax.local_devices()),
    )
    benchmark.group = "dispatch-bound round"
    benchmark.extra_info.update(info)
    print(f"\n{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
