"""A tiny in-memory federated task for engine tests (no dropout, 16 features, 5 classes)."""

import fedjax
import haiku as hk
import jax
import numpy as np

import fathom_tune
from fathom_tune import Bounds, HParams, Target, Task

NUM_CLASSES = 5
FEATURES = 16


def flat(tree):
    """A pytree's leaves as one float64 vector."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def client_arrays(rng, n, w):
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, NUM_CLASSES)), 1).astype(np.int32)
    return {"x": x, "y": y}


def mlp_model(hidden=8, linear_loss=False):
    """A small MLP; with ``linear_loss`` a linear model whose loss is linear in the parameters."""

    def forward(batch):
        x = batch["x"]
        if not linear_loss:
            x = jax.nn.tanh(hk.Linear(hidden)(x))
        return hk.Linear(NUM_CLASSES)(x)

    if linear_loss:

        def train_loss(batch, preds):
            return -jax.numpy.take_along_axis(preds, batch["y"][:, None], axis=1)[:, 0] * 0.1

    else:

        def train_loss(batch, preds):
            return fedjax.metrics.unreduced_cross_entropy_loss(batch["y"], preds)

    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward),
        sample_batch={"x": np.zeros((1, FEATURES), np.float32)},
        train_loss=train_loss,
        eval_metrics={"loss": fedjax.metrics.CrossEntropyLoss(), "accuracy": fedjax.metrics.Accuracy()},
    )


def toy_task(sizes=(30, 45, 60, 25, 50, 40), clients_per_round=4, seed=0, model=None, **kw):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, NUM_CLASSES))
    train = {f"t{i}".encode(): client_arrays(rng, n, w) for i, n in enumerate(sizes)}
    val = {b"v0": client_arrays(rng, 70, w), b"v1": client_arrays(rng, 33, w)}
    test = {b"e0": client_arrays(rng, 50, w)}
    fields = {
        "name": "toy",
        "train": fedjax.InMemoryFederatedData(train),
        "validation": fedjax.InMemoryFederatedData(val),
        "test": fedjax.InMemoryFederatedData(test),
        "model": model or mlp_model(),
        "clients_per_round": clients_per_round,
        "num_rounds": 10,
        "eval_every": 2,
        "target": Target("accuracy", 0.8),
        "init_hparams": HParams(0.1, 1.0, 10.0),
        "bounds": Bounds(HParams(1e-4, 0.01, 1.0), HParams(10.0, 10.0, 256.0)),
    }
    fields.update(kw)
    return Task(**fields)


assert fathom_tune  # the package import applies the fedjax compatibility shim


def crash_in_round(monkeypatch, round_index: int, error: type[BaseException]):
    """Makes every engine raise ``error`` when it starts round ``round_index``;
    returns the real ``Engine.run_round`` (``monkeypatch.setattr`` it back to recover)."""
    from fathom_tune.engine import Engine

    real = Engine.run_round

    def run_round(self, state, hparams):
        if state.round == round_index:
            raise error
        return real(self, state, hparams)

    monkeypatch.setattr(Engine, "run_round", run_round)
    return real
