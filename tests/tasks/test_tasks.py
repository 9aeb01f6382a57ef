"""Tests of fathom_tune.tasks: the built-in task builders and from_arrays."""

import fathom_tune  # noqa: F401, I001  (first: makes fedjax work on current JAX)

import functools
import importlib
import itertools
import os

import fedjax
import haiku as hk
import jax
import numpy as np
import pytest
from fathom_tune import Bounds, HParams, Target, Task, tasks

digits_module = importlib.import_module("fathom_tune.tasks.digits")
shakespeare_module = importlib.import_module("fathom_tune.tasks.shakespeare")
synthetic_module = importlib.import_module("fathom_tune.tasks.synthetic")
cache_module = importlib.import_module("fathom_tune.tasks.fedjax_cache")
fashion_module = importlib.import_module("fathom_tune.tasks.fashion_mnist")


@functools.cache
def built(name, **kwargs):
    return tasks.get(name, **kwargs)


def all_examples(fd):
    """client id -> all its examples (numpy)."""
    return {cid: cds.all_examples() for cid, cds in fd.clients()}


# --------------------------------------------------------------------------
# Every offline builder: the same contract.

OFFLINE = [
    # name, kwargs, x feature shape, x dtype, number of classes of the output
    ("digits", {}, (8, 8, 1), np.float32, 10),
    ("shakespeare", {}, (40,), np.int32, 90),
    ("synthetic", {}, (60,), np.float32, 10),
]


@pytest.mark.parametrize("name, kwargs, x_shape, x_dtype, num_out", OFFLINE)
def test_offline_builder_contract(name, kwargs, x_shape, x_dtype, num_out):
    task = built(name, **kwargs)
    assert isinstance(task, Task)
    assert task.name == name
    assert task.target.metric in task.model.eval_metrics
    assert task.bounds.contains(task.init_hparams)
    assert 1 <= task.clients_per_round < task.train.num_clients()
    assert task.eval_every <= task.num_rounds
    for split in (task.train, task.validation, task.test):
        for cid, examples in all_examples(split).items():
            assert isinstance(cid, bytes)
            assert examples["x"].shape[1:] == x_shape and examples["x"].dtype == x_dtype
            assert examples["y"].dtype == np.int32
            assert len(examples["x"]) == len(examples["y"]) > 0
            assert examples["y"].min() >= 0 and examples["y"].max() < num_out
    # The model runs on a real batch and gives finite scores for every class.
    batch = next(iter(task.train.clients()))[1].padded_batch(batch_size=4).__iter__().__next__()
    params = task.model.init(jax.random.PRNGKey(0))
    preds = task.model.apply_for_eval(params, batch)
    assert preds.shape[-1] == num_out
    metrics = fedjax.evaluate_model(task.model, params, [batch])
    assert np.isfinite(float(metrics[task.target.metric]))


@pytest.mark.parametrize("name", sorted(tasks.REGISTRY))
def test_same_seed_same_task_other_seed_other_split(name):
    if name == "fashion_mnist" and not os.path.isdir(fashion_module.data_dir_of(None)):
        pytest.skip("fashion_mnist needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    a, b = tasks.get(name, seed=3), tasks.get(name, seed=3)
    assert list(a.validation.client_ids()) == list(b.validation.client_ids())
    for (ca, ea), (cb, eb) in zip(a.train.clients(), b.train.clients()):
        assert ca == cb
        np.testing.assert_array_equal(ea.all_examples()["x"], eb.all_examples()["x"])
    other = tasks.get(name, seed=4)
    differs = list(other.validation.client_ids()) != list(a.validation.client_ids()) or any(
        not np.array_equal(ea.all_examples()["x"], eo.all_examples()["x"])
        for (_, ea), (_, eo) in zip(a.validation.clients(), other.validation.clients())
    )
    assert differs


BAD_KWARGS = [
    ("digits", {"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
    ("digits", {"seed": 1.5}, TypeError, r"seed must be an int, got 1.5"),
    (
        "digits",
        {"num_validation_writers": 7, "num_test_writers": 7},
        ValueError,
        r"num_validation_writers=7 \+ num_test_writers=7 .*<= 13",
    ),
    ("digits", {"clients_per_writer": 0}, ValueError, r"clients_per_writer must be in 1..10"),
    ("shakespeare", {"small": "yes"}, TypeError, r"small must be a bool, got 'yes'"),
    ("shakespeare", {"min_chars": 10**9}, ValueError, r"leaving -?\d+ for training"),
    (
        "shakespeare",
        {"validation_fraction": 1.5},
        ValueError,
        r"validation_fraction must be in the open interval \(0, 1\), got 1.5",
    ),
    ("synthetic", {"alpha": -1.0}, ValueError, r"alpha must be a finite number >= 0, got -1.0"),
    (
        "synthetic",
        {"num_clients": 2, "holdout_clients": True},
        ValueError,
        r"num_clients must be >= 3, got 2",
    ),
    (
        "synthetic",
        {"validation_fraction": 0.5, "test_fraction": 0.5},
        ValueError,
        r"validation_fraction=0.5 \+ test_fraction=0.5 must be < 1",
    ),
    ("synthetic", {"iid": 1}, TypeError, r"iid must be a bool, got 1"),
]


@pytest.mark.parametrize("name, kwargs, error, match", BAD_KWARGS)
def test_builders_reject_bad_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        tasks.get(name, **kwargs)


def test_registry_and_get():
    assert set(tasks.REGISTRY) == {"digits", "fashion_mnist", "shakespeare", "synthetic"}
    assert set(tasks.__all__) >= {
        "digits",
        "shakespeare",
        "synthetic",
        "emnist",
        "stackoverflow",
        "shakespeare_fedjax",
        "from_arrays",
        "REGISTRY",
        "get",
    }
    with pytest.raises(ValueError, match=r"unknown task 'mnist'; valid names: \['digits', "):
        tasks.get("mnist")
    assert tasks.get("synthetic", num_clients=4).train.num_clients() == 4


# --------------------------------------------------------------------------
# digits


def writer_of(cid: bytes) -> int:
    return int(cid[len(b"writer") : len(b"writer") + 2])


def test_digits_has_14_writer_forms():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    blocks = digits_module.writer_blocks(labels)
    assert len(blocks) == 14
    assert blocks[0][0] == 0 and blocks[-1][1] == len(labels) == 1797
    assert all(stop == nxt for (_, stop), (nxt, _) in itertools.pairwise(blocks))
    assert all(122 <= stop - start <= 130 for start, stop in blocks)
    for start, stop in blocks:  # every form opens with its 0..9 prefix
        assert labels[start] in (0, 1) and labels[start + 5] in (4, 5, 6)
    with pytest.raises(ValueError, match="do not split into 14 writer forms"):
        digits_module.writer_blocks(np.random.default_rng(0).permutation(labels))


def test_digits_splits_whole_writers():
    task = built("digits")
    writers = {}
    for name in ("train", "validation", "test"):
        sizes = dict(getattr(task, name).client_sizes())
        writers[name] = {}
        for cid, n in sizes.items():
            writers[name][writer_of(cid)] = writers[name].get(writer_of(cid), 0) + n
    assert [len(writers[s]) for s in ("train", "validation", "test")] == [10, 2, 2]
    assert task.train.num_clients() == 20  # each training writer is cut in two
    assert all(b"-" not in cid for cid in task.validation.client_ids())
    every = [w for s in writers.values() for w in s]
    assert sorted(every) == list(range(14))  # disjoint and complete
    sizes = [n for s in writers.values() for n in s.values()]
    assert sum(sizes) == 1797 and all(122 <= n <= 130 for n in sizes)


def test_digits_features():
    task = built("digits")
    examples = all_examples(task.validation)
    x = np.concatenate([e["x"] for e in examples.values()])
    assert 0.0 <= x.min() and x.max() == 1.0
    assert task.init_hparams == HParams(0.1, 1.0, 20.0)
    assert task.bounds.lower.learning_rate == 1e-4 and task.bounds.upper.learning_rate == 10.0


# --------------------------------------------------------------------------
# shakespeare


def test_shakespeare_roles_are_parsed_from_the_markdown():
    roles = shakespeare_module.roles(plays=("othello",))
    iago = roles[b"othello:IAGO"]
    assert iago[0].startswith(b"'Sblood, but you will not hear me:\nIf ever I did dream")
    assert iago[1].startswith(b"Despise me, if I do not.")
    assert b"othello:RODERIGO" in roles
    every = shakespeare_module.roles()
    assert len({cid.split(b":")[0] for cid in every}) == 38
    text = b"".join(s for speeches in every.values() for s in speeches)
    for residue in (b"**", b"_", b"\\[", b"\\-", "\u2014".encode()):
        assert residue not in text, residue
    with pytest.raises(ValueError, match=r"unknown plays \['hamlet2'\]; valid plays: \["):
        shakespeare_module.roles(plays=("hamlet2",))
    with pytest.raises(TypeError, match="got the string 'hamlet'"):
        shakespeare_module.roles(plays="hamlet")


def test_shakespeare_sequences_and_holdout():
    task = built("shakespeare")
    ids = {s: set(getattr(task, s).client_ids()) for s in ("train", "validation", "test")}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert all(
        cid.split(b":")[0].decode() in shakespeare_module.SMALL_PLAYS
        for s in ids.values()
        for cid in s
    )
    shk = fedjax.datasets.shakespeare
    cid = min(ids["train"])
    ex = task.train.get_client(cid).all_examples()
    # FedJAX's own preprocessing of the role's speeches.
    speeches = shakespeare_module.roles(plays=(cid.split(b":")[0].decode(),))[cid]
    expected = shk.preprocess_client(cid, {"snippets": np.array(speeches, dtype=object)}, 40)
    np.testing.assert_array_equal(ex["x"], expected["x"])
    x, y = ex["x"].ravel(), ex["y"].ravel()
    assert x[0] == shk.BOS and np.array_equal(x[1:][x[1:] != 0], y[:-1][x[1:] != 0])
    assert x.max() < shk.VOCAB_SIZE and (y == shk.OOV).sum() == 0


def test_shakespeare_full_variant_uses_fedjax_defaults():
    task = tasks.shakespeare(small=False)
    assert task.name == "shakespeare-full"
    ex = next(iter(task.train.clients()))[1].all_examples()
    assert ex["x"].shape[1] == 80
    params = task.model.init(jax.random.PRNGKey(0))
    lstm_shapes = sorted(v.shape for k, p in params.items() if "lstm" in k for v in p.values())
    assert lstm_shapes == sorted([(1024,), (1024,), (8 + 256, 4 * 256), (256 + 256, 4 * 256)])
    assert task.train.num_clients() > 400


# --------------------------------------------------------------------------
# synthetic


def test_synthetic_sizes_and_example_holdout():
    task = tasks.synthetic(num_clients=12, seed=1)
    ids = [b"client%04d" % k for k in range(12)]
    per_split = [dict(getattr(task, s).client_sizes()) for s in ("train", "validation", "test")]
    for sizes in per_split:
        assert sorted(sizes) == ids  # every client in every split
    totals = [sum(s[cid] for s in per_split) for cid in ids]
    assert min(totals) >= 50  # floor(lognormal(4, 2)) + 50
    for cid, total in zip(ids, totals):
        assert per_split[1][cid] == max(1, round(0.1 * total))


def test_synthetic_holdout_clients_are_disjoint():
    task = tasks.synthetic(num_clients=20, holdout_clients=True)
    ids = [set(getattr(task, s).client_ids()) for s in ("train", "validation", "test")]
    assert [len(i) for i in ids] == [16, 2, 2]
    assert len(set.union(*ids)) == 20


def test_synthetic_generator_statistics():
    rng = np.random.default_rng(0)
    clients = synthetic_module.generate(40, alpha=0.0, beta=0.0, iid=False, rng=rng)
    # Within a client x ~ N(v_k, diag(j^-1.2)).
    centred = np.concatenate([c["x"] - c["x"].mean(0) for c in clients])
    expected = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(centred.var(0), expected, rtol=0.15)

    # Non-IID: v_k ~ N(B_k, 1) per coordinate; IID: v_k = B_k in every coordinate.
    def coordinate_spread(clients):
        return np.array([c["x"].mean(0)[:20].std() for c in clients])

    iid = synthetic_module.generate(10, alpha=1.0, beta=1.0, iid=True, rng=rng)
    non_iid = synthetic_module.generate(10, alpha=1.0, beta=1.0, iid=False, rng=rng)
    assert coordinate_spread(iid).max() < 0.3
    assert coordinate_spread(non_iid).min() > 0.5


def test_synthetic_seed_reproduces_data():
    a = synthetic_module.generate(3, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(5))
    b = synthetic_module.generate(3, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(5))
    c = synthetic_module.generate(3, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(6))
    for ca, cb in zip(a, b):
        np.testing.assert_array_equal(ca["x"], cb["x"])
        np.testing.assert_array_equal(ca["y"], cb["y"])
    assert not np.array_equal(a[0]["x"][:50], c[0]["x"][:50])


# --------------------------------------------------------------------------
# from_arrays


def toy_model(num_out=3):
    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(lambda b: hk.Linear(num_out)(b["x"])),
        sample_batch={"x": np.zeros((1, 4), np.float32), "y": np.zeros((1,), np.int32)},
        train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
        eval_metrics={"accuracy": fedjax.metrics.Accuracy()},
    )


def client(n, seed=0, num_classes=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.integers(0, num_classes, n)


def from_arrays_args(**changes):
    kwargs = {
        "name": "toy",
        "train": {"a": client(10), b"b": client(7, 1)},
        "validation": {"c": client(5, 2)},
        "test": {"d": client(5, 3)},
        "model": toy_model(),
        "clients_per_round": 2,
        "target": Target("accuracy", 0.5),
        "init_hparams": HParams(0.1, 1.0, 4.0),
        "bounds": Bounds(HParams(1e-3, 0.1, 1.0), HParams(1.0, 10.0, 64.0)),
    }
    kwargs.update(changes)
    return kwargs


def test_from_arrays_builds_task():
    task = tasks.from_arrays(**from_arrays_args())
    assert sorted(task.train.client_ids()) == [b"a", b"b"]
    ex = task.train.get_client(b"a").all_examples()
    assert ex["x"].dtype == np.float32 and ex["y"].dtype == np.int32
    np.testing.assert_allclose(ex["x"], client(10)[0].astype(np.float32))
    assert task.num_rounds == 100 and task.eval_every == 5


def with_client(split, cid, value):
    base = from_arrays_args()[split]
    return {split: {**base, cid: value}}


NAN_X = np.ones((5, 4))
NAN_X[2, 1] = np.nan
BAD_FROM_ARRAYS = [
    ({"train": {}}, ValueError, r"train has no clients"),
    ({"validation": [("c", client(5))]}, TypeError, r"validation must be a mapping"),
    (
        with_client("train", "e", (np.zeros((0, 4)), np.zeros(0, int))),
        ValueError,
        r"train\[b'e'\] has 0 examples; every client needs >= 1",
    ),
    (
        with_client("validation", "c", (NAN_X, np.zeros(5, int))),
        ValueError,
        r"validation\[b'c'\] x \(features\): 1 non-finite values .* example 2 \(nan\)",
    ),
    (
        with_client("test", "d", (np.ones((5, 4)), np.array([0, 1, 3, 0, 0]))),
        ValueError,
        r"test\[b'd'\] y: label 3 is outside \[0, 3\) \(num_classes=3\)",
    ),
    (
        with_client("train", "a", (np.ones((5, 4)), np.array([0, -1, 0, 0, 0]))),
        ValueError,
        r"train\[b'a'\] y: label -1 is outside \[0, 3\)",
    ),
    (
        with_client("train", "a", (np.ones((5, 4)), np.zeros(4, int))),
        ValueError,
        r"train\[b'a'\]: x has 5 rows but y has 4",
    ),
    (
        with_client("test", "d", (np.ones((5, 5)), np.zeros(5, int))),
        ValueError,
        r"test\[b'd'\]: x has per-example shape \(5,\), but train\[b'a'\] has \(4,\)",
    ),
    (
        with_client("train", 7, client(5)),
        TypeError,
        r"train: client id 7 is a int; allowed: str or bytes",
    ),
    (with_client("train", b"a", client(5)), ValueError, r"train\[b'a'\]: client id given twice"),
    (
        with_client("train", "e", np.ones((5, 4))),
        TypeError,
        r"train\[b'e'\] must be a pair \(x, y\)",
    ),
    (
        with_client("train", "e", (np.array([["u"] * 4] * 5), np.zeros(5, int))),
        TypeError,
        r"train\[b'e'\] x has dtype <U1; allowed: floating or integer",
    ),
    ({"model": "linear"}, TypeError, r"model must be a fedjax.Model, got str"),
    ({"num_classes": 2}, ValueError, r"label 2 is outside \[0, 2\) \(num_classes=2\)"),
    ({"num_classes": 0}, ValueError, r"num_classes must be >= 1, got 0"),
    ({"model": toy_model(2)}, ValueError, r"is outside \[0, 2\)"),  # inferred from the model
]


@pytest.mark.parametrize("changes, error, match", BAD_FROM_ARRAYS)
def test_from_arrays_rejects_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        tasks.from_arrays(**from_arrays_args(**changes))


def test_from_arrays_names_a_model_that_does_not_fit():
    kwargs = from_arrays_args(
        train={"a": (np.ones((3, 4, 4)), np.zeros(3, int))},
        validation={"c": (np.ones((3, 4, 4)), np.zeros(3, int))},
        test={"d": (np.ones((3, 4, 4)), np.zeros(3, int))},
        model=toy_model(3),
        clients_per_round=1,
    )
    kwargs["model"] = fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(lambda b: hk.Linear(3)(b["x"].reshape(-1, 5))),
        sample_batch={"x": np.zeros((1, 5), np.float32), "y": np.zeros((1,), np.int32)},
        train_loss=lambda b, p: p[:, 0],
        eval_metrics={"accuracy": fedjax.metrics.Accuracy()},
    )
    with pytest.raises(
        ValueError, match=r"model.apply_for_eval failed on one example of train\[b'a'\]"
    ):
        tasks.from_arrays(**kwargs)


# --------------------------------------------------------------------------
# FedJAX's cached data sets: small files in FedJAX's own SQLite format.


def write_sqlite(path, clients):
    with fedjax.SQLiteFederatedDataBuilder(os.fspath(path)) as builder:
        builder.add_many(clients.items())


def emnist_clients(num, seed):
    rng = np.random.default_rng(seed)
    return {
        b"f%04d_%02d" % (2100 + k + 100 * seed, k): {
            "pixels": rng.random((3 + k, 28, 28), dtype=np.float32),
            "label": rng.integers(0, 62, 3 + k).astype(np.int32),
        }
        for k in range(num)
    }


def test_emnist_reads_fedjax_sqlite(tmp_path, monkeypatch):
    train, test = emnist_clients(12, 0), emnist_clients(3, 1)
    write_sqlite(tmp_path / "federated_emnist_train.sqlite", train)
    write_sqlite(tmp_path / "federated_emnist_test.sqlite", test)
    monkeypatch.setenv(cache_module.ENV_VAR, os.fspath(tmp_path))
    task = tasks.emnist(num_validation_clients=2, seed=0)  # directory from the environment
    assert task.name == "emnist"
    train_ids, val_ids = set(task.train.client_ids()), set(task.validation.client_ids())
    assert len(train_ids) == 10 and len(val_ids) == 2 and not train_ids & val_ids
    assert train_ids | val_ids == set(train) and set(task.test.client_ids()) == set(test)
    assert val_ids == set(
        tasks.emnist(cache_dir=tmp_path, num_validation_clients=2).validation.client_ids()
    )
    cid = min(val_ids)
    ex = task.validation.get_client(cid).all_examples()
    assert ex["x"].shape == (len(train[cid]["label"]), 28, 28, 1)
    np.testing.assert_allclose(ex["x"][..., 0], 1 - train[cid]["pixels"])  # FedJAX's flip
    np.testing.assert_array_equal(ex["y"], train[cid]["label"])
    assert task.model.apply_for_eval(task.model.init(jax.random.PRNGKey(0)), ex).shape[-1] == 62
    assert (task.clients_per_round, task.num_rounds, task.target) == (
        10,
        2000,
        Target("accuracy", 0.86),
    )
    assert task.init_hparams == HParams(0.1, 1.0, 20.0)
    assert (
        len(
            list(
                tasks.emnist(
                    cache_dir=tmp_path, num_validation_clients=2, num_test_clients=2
                ).test.client_ids()
            )
        )
        == 2
    )


def test_stackoverflow_reads_fedjax_sqlite_and_tokenizes(tmp_path):
    def user(sentences, kinds):
        n = len(sentences)
        return {
            "creation_date": np.array([b"2018-02-28 19:06:18.34 UTC"] * n, dtype=object),
            "title": np.array([b"a title"] * n, dtype=object),
            "score": np.arange(n, dtype=np.int64),
            "tags": np.array([b"python|numpy"] * n, dtype=object),
            "tokens": np.array(sentences, dtype=object),
            "type": np.array(kinds, dtype=object),
        }

    train = {
        b"%08d" % k: user([b"how do i sort a list", b"use sorted"], [b"question", b"answer"])
        for k in range(4)
    }
    write_sqlite(tmp_path / "stackoverflow_train.sqlite", train)
    write_sqlite(tmp_path / "stackoverflow_test.sqlite", {b"99": user([b"i sort"], [b"answer"])})
    (tmp_path / "stackoverflow.word_count").write_text("i 90\nsort 80\na 70\nlist 60\nhow 50\n")
    task = tasks.stackoverflow(
        cache_dir=tmp_path, vocab_size=4, max_length=5, num_validation_clients=1
    )
    assert task.train.num_clients() == 3 and task.clients_per_round == 3
    ex = next(iter(task.train.clients()))[1].all_examples()
    # vocab ids: i=3 sort=4 a=5 list=6, OOV=7, BOS=1, EOS=2, truncated to 5.
    np.testing.assert_array_equal(ex["x"], [[1, 7, 7, 3, 4], [1, 7, 7, 0, 0]])
    np.testing.assert_array_equal(ex["y"], [[7, 7, 3, 4, 5], [7, 7, 2, 0, 0]])
    np.testing.assert_array_equal(ex["domain_id"], [0, 1])
    test_ex = task.test.get_client(b"99").all_examples()
    np.testing.assert_array_equal(test_ex["y"], [[3, 4, 2, 0, 0]])
    preds = task.model.apply_for_eval(task.model.init(jax.random.PRNGKey(0)), ex)
    assert preds.shape == (2, 5, 4 + 4)
    assert task.target == Target("accuracy_in_vocab", 0.23)
    assert task.init_hparams == HParams(0.32, 1.0, 16.0) and task.num_rounds == 1500


def test_shakespeare_fedjax_reads_fedjax_sqlite(tmp_path):
    snippets = {
        b"THE_TEMPEST_MIRANDA": [b"If by your art, my dearest father", b"O, I have"],
        b"HAMLET_HORATIO": [b"Friends to this ground."],
        b"OTHELLO_IAGO": [b"Call up her father"],
    }
    clients = {cid: {"snippets": np.array(s, dtype=object)} for cid, s in snippets.items()}
    write_sqlite(tmp_path / "shakespeare_train.sqlite", clients)
    write_sqlite(tmp_path / "shakespeare_test.sqlite", {b"X": clients[b"OTHELLO_IAGO"]})
    task = tasks.shakespeare_fedjax(cache_dir=tmp_path, num_validation_clients=1)
    assert task.train.num_clients() == 2 and task.validation.num_clients() == 1
    ex = task.train.get_client(b"THE_TEMPEST_MIRANDA").all_examples()
    expected = fedjax.datasets.shakespeare.preprocess_client(
        None, clients[b"THE_TEMPEST_MIRANDA"], 80
    )
    np.testing.assert_array_equal(ex["x"], expected["x"])
    assert ex["x"].shape == (1, 80)
    assert task.target == Target("accuracy_in_vocab", 0.56)
    short = tasks.shakespeare_fedjax(
        cache_dir=tmp_path, num_validation_clients=1, sequence_length=8
    )
    ex = short.test.get_client(b"X").all_examples()
    assert ex["x"].shape == (3, 8)  # BOS + 18 characters + EOS, cut into 8s
    assert short.model.apply_for_eval(short.model.init(jax.random.PRNGKey(0)), ex).shape == (
        3,
        8,
        90,
    )


BUCKET = "https://storage.googleapis.com/gresearch/fedjax"  # as in fedjax/datasets/*.py


@pytest.mark.parametrize(
    "builder, present, missing, url",
    [
        (
            tasks.emnist,
            [],
            "federated_emnist_train.sqlite",
            BUCKET + "/emnist/federated_emnist_train.sqlite",
        ),
        (
            functools.partial(tasks.emnist, only_digits=True),
            ["federated_emnist_train.sqlite", "federated_emnist_test.sqlite"],
            "federated_emnist_digitsonly_train.sqlite",
            BUCKET + "/emnist/federated_emnist_digitsonly_train.sqlite",
        ),
        (
            tasks.stackoverflow,
            ["stackoverflow_train.sqlite", "stackoverflow_test.sqlite"],
            "stackoverflow.word_count",
            BUCKET + "/stackoverflow/stackoverflow.word_count",
        ),
        (
            tasks.shakespeare_fedjax,
            ["shakespeare_train.sqlite"],
            "shakespeare_test.sqlite",
            BUCKET + "/shakespeare/shakespeare_test.sqlite",
        ),
    ],
)
def test_missing_file_names_file_directory_and_url(tmp_path, builder, present, missing, url):
    for name in present:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        builder(cache_dir=tmp_path)
    message = str(info.value)
    assert missing in message and os.fspath(tmp_path) in message and url in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(present)  # nothing downloaded


def test_cache_dir_resolution(monkeypatch):
    monkeypatch.setenv(cache_module.ENV_VAR, "/from/env")
    assert cache_module.cache_dir_of("/given") == "/given"
    assert cache_module.cache_dir_of(None) == "/from/env"
    monkeypatch.delenv(cache_module.ENV_VAR)
    assert cache_module.cache_dir_of(None) == os.path.expanduser("~/.cache/fedjax")
    with pytest.raises(TypeError, match="cache_dir must be a str, an os.PathLike or None, got 3"):
        cache_module.cache_dir_of(3)
