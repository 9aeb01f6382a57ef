"""Tests of fathom_tune.tasks.fashion_mnist: the idx reader, the Dirichlet split, the task."""

import fathom_tune  # noqa: F401, I001  (first: makes fedjax work on current JAX)

import gzip
import importlib
import os
import struct

import numpy as np
import pytest
from fathom_tune import tasks

fm = importlib.import_module("fathom_tune.tasks.fashion_mnist")

REAL_DIR = "/usr/share/datasets/fashion-mnist/"


def write_idx(path, array, *, magic=None, compress=None):
    """Writes ``array`` (uint8) in the idx format, independently of the reader."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_pair(directory, n=300, *, gz=True, seed=0):
    """A small Fashion-MNIST-like pair of files; returns (images, labels) written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_load_train_reads_written_idx_files(tmp_path, gz):
    images, labels = write_pair(tmp_path, n=37, gz=gz)
    x, y = fm.load_train(tmp_path)
    assert x.shape == (37, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (37,) and y.dtype == np.int32
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=0, atol=1e-7)
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 1, 0] == 1.0


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    write_pair(tmp_path, n=5)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert fm.load_train()[0].shape == (5, 28, 28, 1)
    monkeypatch.delenv(fm.ENV_VAR)
    assert fm.data_dir_of(None) == "/usr/share/datasets/fashion-mnist/"


def test_missing_file_names_it_the_directory_and_the_package(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(FileNotFoundError) as err:
        tasks.fashion_mnist(data_dir=tmp_path)
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message and str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message and fm.ENV_VAR in message


@pytest.mark.parametrize(
    "name, magic, array, match",
    [
        (
            "train-images-idx3-ubyte.gz",
            2049,
            np.zeros((3, 28, 28)),
            r"magic number 2049 .*expected .*2051",
        ),
        ("train-labels-idx1-ubyte", 2051, np.zeros(3), r"magic number 2051 .*expected .*2049"),
        ("train-images-idx3-ubyte", None, np.zeros((3, 28, 28)), None),  # truncated below
    ],
)
def test_bad_header_names_the_file_and_what_was_expected(tmp_path, name, magic, array, match):
    write_pair(tmp_path, n=3)
    base = name.removesuffix(".gz")
    for stale in (base, base + ".gz"):
        (tmp_path / stale).unlink(missing_ok=True)
    path = tmp_path / name
    write_idx(path, array, magic=magic)
    if match is None:  # values missing after a correct header
        path.write_bytes(path.read_bytes()[:-5])
        match = r"shape \(3, 28, 28\), 2352 values, but 2347 bytes follow"
    with pytest.raises(ValueError, match=match) as err:
        fm.load_train(tmp_path)
    assert str(path) in str(err.value)


def test_short_header_and_broken_gzip(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"'.*short' is 3 bytes long, too short for the header"):
        fm.read_idx(short, fm.LABELS_MAGIC)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"broken.gz' is not a readable gzip file"):
        fm.read_idx(broken, fm.LABELS_MAGIC)


def test_images_and_labels_must_agree(tmp_path):
    write_pair(tmp_path, n=4)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(ValueError, match=r"holds 4 images but .* 5 labels"):
        fm.load_train(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(4, 10))
    with pytest.raises(ValueError, match=r"holds label 10; expected labels 0..9"):
        fm.load_train(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 27, 28)))
    with pytest.raises(ValueError, match=r"images of 27x28 pixels"):
        fm.load_train(tmp_path)


# --------------------------------------------------------------------------
# The Dirichlet split, against the construction done here with numpy.


def direct_split_counts(labels, num_clients, alpha, seed, min_examples):
    """Per-client label counts [num_clients, classes] and the proportions of the accepted draw."""
    rng = np.random.default_rng(seed)
    classes = labels.max() + 1
    while True:
        counts = np.zeros((num_clients, classes), int)
        props = []
        for c in range(classes):
            n_c = int((labels == c).sum())
            rng.permutation(n_c)  # the shuffle: same draws, the order does not change counts
            p = rng.dirichlet(alpha * np.ones(num_clients))
            props.append(p)
            bounds = np.concatenate([[0], (np.cumsum(p) * n_c).astype(int)[:-1], [n_c]])
            counts[:, c] = np.diff(bounds)
        if counts.sum(axis=1).min() >= min_examples:
            return counts, np.array(props).T


@pytest.mark.parametrize("alpha, min_examples", [(0.3, 1), (0.1, 25), (5.0, 0)])
def test_dirichlet_split_matches_the_direct_construction(alpha, min_examples):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 10, 1000)
    parts = fm.dirichlet_split(
        labels, 12, alpha=alpha, rng=np.random.default_rng(5), min_examples=min_examples
    )
    assert len(parts) == 12
    every = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(every), np.arange(1000))  # each example exactly once
    got = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    expected, props = direct_split_counts(labels, 12, alpha, 5, min_examples)
    np.testing.assert_array_equal(got, expected)
    assert got.sum(axis=1).min() >= min_examples
    per_class = np.bincount(labels, minlength=10)
    assert np.all(np.abs(got - props * per_class) < 1.0)  # the drawn proportions, to rounding


def test_dirichlet_split_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    skewed = fm.dirichlet_split(labels, 10, alpha=0.05, rng=np.random.default_rng(0))
    even = fm.dirichlet_split(labels, 10, alpha=1000.0, rng=np.random.default_rng(0))

    def top_share(parts):
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)])

    assert top_share(skewed) > 0.6 and top_share(even) < 0.2


def test_dirichlet_split_gives_up_with_a_clear_message():
    with pytest.raises(
        ValueError, match=r"1000 draws of Dir\(alpha=0.01\) .* fewer than min_examples=9"
    ):
        fm.dirichlet_split(
            np.arange(100) % 10, 10, alpha=0.01, rng=np.random.default_rng(0), min_examples=9
        )
    with pytest.raises(ValueError, match=r"need 110 examples, but there are 100"):
        fm.dirichlet_split(
            np.arange(100) % 10, 10, alpha=1.0, rng=np.random.default_rng(0), min_examples=11
        )


# --------------------------------------------------------------------------
# The task on written files.


def test_task_on_written_files_uses_every_chosen_example_once(tmp_path):
    images, labels = write_pair(tmp_path, n=400)
    task = tasks.fashion_mnist(data_dir=tmp_path, num_examples=300, num_clients=10, min_examples=5)
    splits = [task.train, task.validation, task.test]
    assert [s.num_clients() for s in splits] == [8, 1, 1]
    ids = [cid for s in splits for cid in s.client_ids()]
    assert sorted(ids) == [b"client%03d" % k for k in range(10)]
    xs, ys = [], []
    for split in splits:
        for _, client in split.clients():
            examples = client.all_examples()
            assert examples["x"].shape[1:] == (28, 28, 1) and examples["x"].dtype == np.float32
            assert len(examples["y"]) >= 5
            xs.append(examples["x"])
            ys.append(examples["y"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(y) == 300
    # Each image is the written one (pixels identify it), each used once, with its label.
    keys = {images[i].tobytes(): i for i in range(len(images))}
    rows = [keys[np.round(img[..., 0] * 255).astype(np.uint8).tobytes()] for img in x]
    assert len(set(rows)) == 300
    chosen = np.sort(np.random.default_rng(0).permutation(400)[:300])
    assert sorted(rows) == chosen.tolist()
    np.testing.assert_array_equal(labels[rows], y)
    assert task.bounds.contains(task.init_hparams) and task.target.metric in task.model.eval_metrics


def test_task_seed_reproduces_and_changes_the_split(tmp_path):
    write_pair(tmp_path, n=200)

    def sizes(seed):
        t = tasks.fashion_mnist(
            data_dir=tmp_path, num_examples=200, num_clients=5, seed=seed, min_examples=1
        )
        return {cid: len(c.all_examples()["y"]) for cid, c in t.train.clients()}

    assert sizes(1) == sizes(1) and sizes(1) != sizes(2)


BAD = [
    ({"num_clients": 2}, ValueError, r"num_clients must be >= 3, got 2"),
    ({"num_clients": 5.0}, TypeError, r"num_clients must be an int, got 5.0"),
    ({"alpha": 0.0}, ValueError, r"alpha must be a finite number > 0, got 0.0"),
    ({"alpha": "1"}, TypeError, r"alpha must be a real number, got '1'"),
    ({"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
    ({"num_examples": 0}, ValueError, r"num_examples must be >= 1, got 0"),
    ({"min_examples": 0}, ValueError, r"min_examples must be >= 1, got 0"),
    ({"data_dir": 3}, TypeError, r"data_dir must be a str, an os.PathLike or None, got 3"),
    (
        {"validation_fraction": 0.6, "test_fraction": 0.5},
        ValueError,
        r"validation_fraction=0.6 \+ test_fraction=0.5 must be < 1",
    ),
    ({"num_examples": 1000}, ValueError, r"num_examples=1000 but the training files in .* hold 50"),
    (
        {"num_clients": 30},
        ValueError,
        r"num_clients=30 clients of at least min_examples=10 need 300",
    ),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_fashion_mnist_rejects_bad_arguments(tmp_path, kwargs, error, match):
    write_pair(tmp_path, n=50)
    kwargs = {"data_dir": tmp_path, "num_examples": 50, **kwargs}
    with pytest.raises(error, match=match):
        tasks.fashion_mnist(**kwargs)


# --------------------------------------------------------------------------
# The real data, where Debian's package is installed.


@pytest.mark.skipif(
    not os.path.isdir(REAL_DIR),
    reason=f"{REAL_DIR} is absent: install Debian's package dataset-fashion-mnist",
)
def test_real_data_and_default_task():
    x, y = fm.load_train(REAL_DIR)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 6000))  # the published balance
    assert y[:5].tolist() == [9, 0, 0, 3, 0]  # as load_train's docstring prints
    small = tasks.fashion_mnist(num_examples=2000, num_clients=20)  # fashion_mnist's docstring
    assert [s.num_clients() for s in (small.train, small.validation, small.test)] == [16, 2, 2]
    task = tasks.fashion_mnist()
    assert task.name == "fashion-mnist" and task.clients_per_round == 10
    assert [s.num_clients() for s in (task.train, task.validation, task.test)] == [80, 10, 10]
    total = sum(
        len(c.all_examples()["y"])
        for s in (task.train, task.validation, task.test)
        for _, c in s.clients()
    )
    assert total == 6000
