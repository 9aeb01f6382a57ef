"""Tests of your own data in ten lines: the ready models, the default rule, the hold-out
helper, and the README's "Your own data in ten lines" example run as written."""

from __future__ import annotations

import pathlib
import re
import runpy

import fedjax
import haiku as hk
import jax
import numpy as np
import pytest

import fathom_tune
from fathom_tune import Bounds, HParams, Target, tasks
from fathom_tune.tasks.models import MeanSquaredError

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def shapes(model: fedjax.Model) -> dict[str, tuple]:
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return {f"{m}/{k}": v.shape for m, p in params.items() for k, v in p.items()}


def out_shape(model: fedjax.Model, x_shape, n=3) -> tuple:
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    batch = {"x": jax.ShapeDtypeStruct((n, *x_shape), np.float32)}
    return jax.eval_shape(model.apply_for_eval, params, batch).shape


def has_conv(model: fedjax.Model, x_shape) -> bool:
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    batch = {"x": np.zeros((2, *x_shape), np.float32)}
    return "conv_general_dilated" in str(jax.make_jaxpr(model.apply_for_eval)(params, batch))


def clients_of(sizes, *, x_shape=(4,), seed=0, labels=None):
    """Clients ``c0, c1, ...`` with ``sizes`` examples; integer labels 0..2 unless given."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate(sizes):
        y = rng.integers(0, 3, n) if labels is None else labels[i]
        out[f"c{i}"] = (rng.normal(size=(n, *x_shape)), y)
    return out


# ------------------------------------------------------------------ ready models
def test_feature_vectors_get_an_mlp():
    model = tasks.ready_model((8,), num_classes=3)
    assert shapes(model) == {
        "linear/w": (8, 64), "linear/b": (64,),
        "linear_1/w": (64, 64), "linear_1/b": (64,),
        "linear_2/w": (64, 3), "linear_2/b": (3,),
    }  # fmt: skip
    assert not has_conv(model, (8,))
    assert sorted(model.eval_metrics) == ["accuracy", "loss"]


@pytest.mark.parametrize(
    "x_shape, in_channels, flat",
    [((8, 8), 1, 2 * 2 * 32), ((28, 28, 3), 3, 7 * 7 * 32), ((5, 5, 2), 2, 2 * 2 * 32)],
)
def test_images_get_a_small_cnn(x_shape, in_channels, flat):
    model = tasks.ready_model(x_shape, num_classes=10)
    assert has_conv(model, x_shape)
    assert shapes(model) == {
        "conv2_d/w": (3, 3, in_channels, 16), "conv2_d/b": (16,),
        "conv2_d_1/w": (3, 3, 16, 32), "conv2_d_1/b": (32,),
        "linear/w": (flat, 64), "linear/b": (64,),
        "linear_1/w": (64, 10), "linear_1/b": (10,),
    }  # fmt: skip
    assert out_shape(model, x_shape) == (3, 10)


@pytest.mark.parametrize("y_shape, expected", [((), (5,)), ((2,), (5, 2)), ((2, 3), (5, 2, 3))])
def test_regression_head_predicts_the_label_shape(y_shape, expected):
    model = tasks.ready_model((4,), y_shape=y_shape)
    assert sorted(model.eval_metrics) == ["loss"]
    assert isinstance(model.eval_metrics["loss"], MeanSquaredError)
    assert out_shape(model, (4,), n=5) == expected


def test_ready_models_are_deterministic_and_shared():
    assert tasks.ready_model((8,), num_classes=3) is tasks.ready_model((8,), num_classes=3)
    model = tasks.ready_model((6,), num_classes=4)
    x = {"x": np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)}
    run = jax.jit(lambda key: model.apply_for_eval(model.init(key), x))
    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)


def test_mean_squared_error_by_hand():
    metric = MeanSquaredError()
    batch = {"y": np.array([[0.0, 0.0], [4.0, 1.0], [9.0, 9.0]], np.float32)}
    preds = np.array([[1.0, 1.0], [2.0, 1.0], [0.0, 0.0]], np.float32)
    # per example: mean(1, 1) = 1, mean(4, 0) = 2; the third is masked out
    stat = fedjax.metrics.evaluate_batch(metric, batch, preds, np.array([True, True, False]))
    assert float(stat.result()) == pytest.approx(1.5)
    loss = tasks.ready_model((1,), y_shape=(2,)).train_loss(batch, preds)
    np.testing.assert_allclose(loss, [1.0, 2.0, 81.0])


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (((),), {"num_classes": 2}, ValueError, r"x_shape=\(\) has rank 0; the ready models take"),
        (((2, 2, 2, 2),), {}, ValueError, r"rank 4; .* pass your own model"),
        (([8],), {}, TypeError, r"x_shape must be a tuple of ints, got \[8\]"),
        (((8, 0),), {}, ValueError, r"x_shape=\(8, 0\) has a dimension < 1"),
        (((8,),), {"num_classes": 0}, ValueError, r"num_classes must be >= 1, got 0"),
        (((8,),), {"num_classes": 3, "y_shape": (2,)}, ValueError, r"y_shape=\(2,\) with num_c"),
    ],
)
def test_ready_model_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tasks.ready_model(*args, **kwargs)


def test_from_arrays_picks_the_model_by_shape_and_labels():
    flat = clients_of([5, 6, 7])
    images = clients_of([5, 6, 7], x_shape=(6, 6))
    a, b, c = (dict([kv]) for kv in flat.items())
    task = tasks.from_arrays("flat", a, b, c)
    assert task.model is tasks.ready_model((4,), num_classes=3)
    a, b, c = (dict([kv]) for kv in images.items())
    assert has_conv(tasks.from_arrays("img", a, b, c).model, (6, 6))
    regression = {k: (x, y.astype(float)) for k, (x, y) in flat.items()}
    a, b, c = (dict([kv]) for kv in regression.items())
    assert tasks.from_arrays("reg", a, b, c).model is tasks.ready_model((4,), y_shape=())


def test_num_classes_is_the_largest_label_of_all_splits_plus_one():
    x = np.zeros((3, 4))
    train = {"a": (x, np.array([0, 1, 1]))}
    test = {"c": (x, np.array([0, 4, 0]))}  # the largest label may be in any split
    task = tasks.from_arrays("k", train, {"b": (x, np.array([2, 0, 0]))}, test)
    assert shapes(task.model)["linear_2/w"] == (64, 5)
    task = tasks.from_arrays("k", train, train, train, num_classes=7)
    assert shapes(task.model)["linear_2/w"] == (64, 7)


# ------------------------------------------------------------------ the default rule, by hand
@pytest.mark.parametrize(
    "sizes, batch, max_batch, per_round",
    [
        ([3, 10, 47, 200, 61], 9.0, 200.0, 5),  # median 47: 47 / 5 = 9.4 -> 9
        ([12, 13], 3.0, 13.0, 2),  # median 12.5: 2.5 rounds half up to 3
        ([1, 2, 2], 1.0, 2.0, 3),  # median 2: 0.4 -> 0, at least 1
        ([1000] * 12 + [5000], 64.0, 5000.0, 10),  # median 1000: 200, at most 64
        ([7], 1.0, 7.0, 1),  # median 7: 1.4 -> 1
    ],
)
def test_default_start_bounds_and_clients_per_round(sizes, batch, max_batch, per_round):
    held_out = clients_of([4])
    task = tasks.from_arrays("d", clients_of(sizes, seed=1), held_out, held_out)
    assert task.init_hparams == HParams(learning_rate=0.1, local_epochs=1.0, batch_size=batch)
    assert task.bounds == Bounds(HParams(1e-4, 0.01, 1.0), HParams(10.0, 10.0, max_batch))
    assert task.clients_per_round == per_round
    assert (task.num_rounds, task.eval_every) == (100, 5)


def test_default_classification_target_halves_the_majority_error():
    x = np.zeros((3, 2))
    validation = {"v1": (x, np.array([0, 0, 0])), "v2": (x, np.array([1, 2, 1]))}
    task = tasks.from_arrays("t", {"a": (x, np.array([0, 1, 2]))}, validation, validation)
    # majority label 0: 3 of 6, m = 0.5; target (1 + 0.5) / 2
    assert task.target == Target("accuracy", 0.75, "max")


def test_default_regression_target_halves_the_label_variance():
    x = np.zeros((2, 3))
    train = {"a": (x, np.array([0.0, 1.0]))}
    validation = {"v1": (x, np.array([1.0, 3.0])), "v2": (x[:1], np.array([5.0]))}
    task = tasks.from_arrays("r", train, validation, train)
    # validation labels 1, 3, 5: mean 3, variance (4 + 0 + 4) / 3 = 8 / 3
    assert task.target == Target("loss", 4.0 / 3.0, "min")
    y2 = np.array([[0.0, 0.0], [2.0, 4.0]])  # column variances 1 and 4: mean 2.5
    task = tasks.from_arrays("r2", {"a": (x, y2)}, {"v": (x, y2)}, {"t": (x, y2)})
    assert task.target == Target("loss", 1.25, "min")


def test_every_default_can_be_overridden():
    held_out = clients_of([4])
    train = clients_of([3, 10, 47, 200, 61], seed=1)
    target = Target("loss", 0.5, "min")
    task = tasks.from_arrays(
        "o", train, held_out, held_out,
        clients_per_round=2, num_rounds=7, eval_every=1, target=target,
        init_hparams=HParams(0.3, 2.0, 100.0),
    )  # fmt: skip
    assert (task.clients_per_round, task.num_rounds, task.eval_every) == (2, 7, 1)
    assert task.target == target and task.init_hparams == HParams(0.3, 2.0, 100.0)
    bounds = Bounds(HParams(0.01, 0.5, 1.0), HParams(0.05, 5.0, 4.0))
    task = tasks.from_arrays("o", train, held_out, held_out, bounds=bounds)
    assert task.bounds == bounds
    assert task.init_hparams == HParams(0.05, 1.0, 4.0)  # the default start, clipped


def linear_model(num_out=3, metrics=None):
    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(lambda b: hk.Linear(num_out)(b["x"])),
        sample_batch={"x": np.zeros((1, 4), np.float32), "y": np.zeros((1,), np.int32)},
        train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
        eval_metrics=metrics or {"accuracy": fedjax.metrics.Accuracy()},
    )


def test_your_own_model_gets_the_same_defaults():
    held_out = clients_of([4])
    task = tasks.from_arrays("m", clients_of([12, 13]), held_out, held_out, model=linear_model())
    assert task.init_hparams.batch_size == 3.0 and task.target.metric == "accuracy"


X4 = np.zeros((3, 4))


def every_split(x, y) -> dict:
    """The same client ``(x, y)`` as the train, validation and test split."""
    return {split: {cid: (x, y)} for split, cid in zip(("train", "validation", "test"), "abc")}


BAD = [
    ({"model": "mlp"}, TypeError, r"model must be a fedjax.Model, got str; pass None"),
    ({"target": "accuracy"}, TypeError, r"target must be a fathom_tune.Target or None, got str"),
    ({"bounds": (1, 2)}, TypeError, r"bounds must be a fathom_tune.Bounds or None, got tuple"),
    ({"init_hparams": 0.1}, TypeError, r"init_hparams must be a fathom_tune.HParams or None"),
    (
        every_split(np.zeros((3, 2, 2, 2, 1)), np.array([0, 1, 2])),
        ValueError,
        r"train\[b'a'\] x has per-example shape \(2, 2, 2, 1\); the ready models take",
    ),
    (
        every_split(X4, np.array([[0, 1], [1, 0], [2, 2]])),
        ValueError,
        r"train\[b'a'\] y has per-example shape \(2,\); integer labels are class indices",
    ),
    (
        every_split(X4, np.zeros(3, int)),
        ValueError,
        r"num_classes=1 \(every label is 0\): the ready classifier needs at least 2 classes",
    ),
    (
        {**every_split(X4, np.zeros(3)), "num_classes": 3},
        ValueError,
        r"num_classes=3 is for integer labels \(classes\), but train\[b'a'\] y is floating",
    ),
    (
        {"validation": {"b": (X4, np.zeros(3))}},
        ValueError,
        r"validation\[b'b'\]: y is floating \(regression\), but train\[b'a'\] y is integer",
    ),
    (
        {"model": linear_model(metrics={"loss": fedjax.metrics.CrossEntropyLoss()})},
        ValueError,
        r"target=None: the default target is an accuracy, but the model's eval_metrics are \['loss",
    ),
    (
        {**every_split(X4, np.arange(3.0)), "model": linear_model()},
        ValueError,
        r"floating labels \(regression\) have a default target only with the ready model",
    ),
]


@pytest.mark.parametrize("changes, error, match", BAD)
def test_from_arrays_names_the_bad_argument(changes, error, match):
    kwargs = {
        "train": {"a": (X4, np.array([0, 1, 2]))},
        "validation": {"b": (X4, np.array([0, 1, 1]))},
        "test": {"c": (X4, np.array([2, 1, 0]))},
        **changes,
    }
    with pytest.raises(error, match=match):
        tasks.from_arrays("bad", **kwargs)


# ------------------------------------------------------------------ holding out clients
@pytest.mark.parametrize(
    "num, fractions, counts",
    [(30, (0.2, 0.2), (18, 6, 6)), (10, (0.1, 0.3), (6, 1, 3)), (3, (0.2, 0.2), (1, 1, 1)),
     (5, (0.01, 0.01), (3, 1, 1))],
)  # fmt: skip
def test_holdout_counts_and_disjoint_whole_clients(num, fractions, counts):
    clients = {f"u{i}": object() for i in range(num)}
    parts = tasks.holdout_clients(
        clients, validation_fraction=fractions[0], test_fraction=fractions[1]
    )
    assert tuple(len(p) for p in parts) == counts
    ids = [cid for p in parts for cid in p]
    assert sorted(ids) == sorted(clients)  # disjoint, and together every client
    assert all(p[cid] is clients[cid] for p in parts for cid in p)  # values passed through


def test_holdout_is_seeded_and_independent_of_the_mapping_order():
    clients = {f"u{i:02d}": i for i in range(20)}
    first = tasks.holdout_clients(clients, seed=3)
    assert tasks.holdout_clients(dict(reversed(list(clients.items()))), seed=3) == first
    assert tasks.holdout_clients(clients, seed=4) != first
    train, validation, test = tasks.holdout_clients({"a": 0, "b": 1, b"c": 2, "d": 3, "e": 4})
    # sorted by bytes a, b, c, d, e; default_rng(0).permutation(5) = [2, 4, 3, 0, 1]
    assert (list(train), list(validation), list(test)) == (["a", "b", "d"], [b"c"], ["e"])


@pytest.mark.parametrize(
    "clients, kwargs, error, match",
    [
        ([("a", 1)], {}, TypeError, r"clients must be a mapping client id -> \(x, y\), got list"),
        ({"a": 1, "b": 2}, {}, ValueError, r"clients has 2 clients; .* needs at least 3"),
        ({}, {}, ValueError, r"clients has 0 clients"),
        ({"a": 1, 7: 2, "c": 3}, {}, TypeError, r"client id 7 is a int; allowed: str or bytes"),
        ({"a": 1, b"a": 2, "c": 3}, {}, ValueError, r"client id b'a' given twice"),
        ({f"{i}": i for i in range(9)}, {"validation_fraction": 0.0}, ValueError,
         r"validation_fraction must be in the open interval \(0, 1\), got 0.0"),
        ({f"{i}": i for i in range(9)}, {"validation_fraction": 0.5, "test_fraction": 0.5},
         ValueError, r"must be < 1 to leave data for training"),
        ({f"{i}": i for i in range(4)}, {"validation_fraction": 0.45, "test_fraction": 0.45},
         ValueError, r"hold out 2 \+ 2 of 4 units, leaving 0 for training"),
        ({f"{i}": i for i in range(9)}, {"seed": -1}, ValueError, r"^seed must be an int >= 0"),
    ],
)  # fmt: skip
def test_holdout_rejects_bad_input(clients, kwargs, error, match):
    with pytest.raises(error, match=match):
        tasks.holdout_clients(clients, **kwargs)


def test_from_clients_holds_out_then_builds_with_the_defaults():
    clients = clients_of([40] * 30)
    task = tasks.from_clients("mine", clients, seed=2, num_rounds=3)
    train, validation, test = tasks.holdout_clients(clients, seed=2)
    assert sorted(task.validation.client_ids()) == sorted(c.encode() for c in validation)
    assert sorted(task.test.client_ids()) == sorted(c.encode() for c in test)
    assert task.train.num_clients() == len(train) == 18
    assert task.init_hparams == HParams(0.1, 1.0, 8.0) and task.num_rounds == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_round'"):
        tasks.from_clients("mine", clients, num_round=3)


# ------------------------------------------------------------------ training with the defaults
def test_regression_over_images_trains_and_reports_the_mean_squared_error():
    rng = np.random.default_rng(0)
    clients = {}
    for i in range(6):
        x = rng.normal(size=(12, 4, 4))
        clients[f"u{i}"] = (x, x.mean(axis=(1, 2)))
    task = tasks.from_clients("reg", clients, validation_fraction=0.3)
    assert has_conv(task.model, (4, 4)) and task.target.mode == "min"
    result = fathom_tune.fedavg(task, num_rounds=2, eval_every=1)
    examples = [task.validation.get_client(c).all_examples() for c in task.validation.client_ids()]
    x = np.concatenate([e["x"] for e in examples])
    y = np.concatenate([e["y"] for e in examples])
    preds = np.asarray(task.model.apply_for_eval(result.params, {"x": x}))
    mse = float(np.mean((preds - y) ** 2))
    assert result.validation_metrics["loss"] == pytest.approx(mse, rel=1e-4)


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("### Your own data in ten lines", 1)[1].split("\n#", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "own_data.py"
    script.write_text(code)
    namespace = runpy.run_path(str(script), run_name="own_data")
    task, result = namespace["task"], namespace["result"]
    assert task.train.num_clients() == 18 and task.clients_per_round == 10
    assert task.target.metric == "accuracy" and 0.6 < task.target.value < 0.75
    assert result.rounds_to_target is not None and result.rounds_to_target <= 20
    assert result.test_metrics["accuracy"] >= task.target.value
    assert f"rounds to target: {result.rounds_to_target}" in capsys.readouterr().out
