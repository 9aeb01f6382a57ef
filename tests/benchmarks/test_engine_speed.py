"""Round time of the engine against FedJAX's own ``fed_avg`` on identical data.

Run: python -m pytest tests/benchmarks -o addopts="" --benchmark-columns=mean,stddev,rounds

Each pair of benchmarks shares a group; BENCHMARKS.md reports the ratio of
the means (FedJAX / engine; above 1 means the engine is faster).
"""

import fedjax
import jax
import numpy as np
import pytest
from fedjax.algorithms import fed_avg

import fathom_tune
from fathom_tune import Bounds, HParams, Target, Task
from fathom_tune.engine import Engine

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


def engine_round(task, hparams, seed=0, **kwargs):
    engine = Engine(task, seed=seed, **kwargs)
    state = [engine.init()]

    def step():
        # The same round (same clients) every time, like the FedJAX closure.
        s, _ = engine.run_round(state[0], hparams)
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


def test_batch_size_sweep_compilations(benchmark):
    """Compiled programs when B drifts from 4 to 256 over 40 rounds (digits)."""
    task = fathom_tune.tasks.digits()
    engine = Engine(task, seed=0)

    def sweep():
        state = engine.init()
        for b in np.geomspace(4, 256, 40):
            state, _ = engine.run_round(state, HParams(0.1, 1.0, float(b)))
        return engine.compile_counts

    counts = benchmark.pedantic(sweep, rounds=1, iterations=1)
    benchmark.extra_info.update(counts)
    benchmark.group = "compilations"
    assert counts["local_steps"] <= 13
