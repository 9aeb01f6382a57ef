"""FedJAX's own federated data sets, read from a local cache directory.

The tasks of S. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush,
J. Konečný, S. Kumar and H. B. McMahan, "Adaptive Federated Optimization",
ICLR 2021, arXiv 2003.00295, on which "Federated Hypergradient Descent"
(A. K. Kan, arXiv 2211.02106) reports FATHOM: federated EMNIST, Stack
Overflow next-word prediction and Shakespeare next-character prediction.

The data is loaded by FedJAX's real loaders (``fedjax.datasets.emnist``,
``.stackoverflow``, ``.shakespeare``), which read ``<cache_dir>/<file>.sqlite``
and download the file from Google's bucket when it is absent. These
builders never download: they check first that every file is in the cache
directory and otherwise raise :class:`FileNotFoundError` naming the file,
the directory and the URL to fetch it from; a truncated or corrupted SQLite
file (not FedJAX's ``federated_data`` table, or a first client that does not
decode) raises :class:`ValueError` naming the file. The cache directory is
the ``cache_dir`` argument, else the environment variable
``FATHOM_TUNE_DATA_DIR``, else FedJAX's default ``~/.cache/fedjax``.

Validation clients are whole clients carved off FedJAX's train split
(chosen by ``seed``); the test split is FedJAX's test split.

Stack Overflow: FedJAX's tokenizer (``StackoverflowTokenizer``) needs
TensorFlow and reads its vocabulary from ``gs://``; this module reads the
same vocabulary file (``stackoverflow.word_count``) from the cache directory
and tokenizes with NumPy, with the same ids as FedJAX's tokenizer with one
OOV bucket: 0 PAD, 1 BOS, 2 EOS, word ``i`` of the vocabulary ``i + 3``,
out-of-vocabulary ``vocab_size + 3``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence

import fedjax
import numpy as np
from fedjax.core import sqlite_federated_data

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task

__all__ = [
    "ENV_VAR",
    "cache_dir_of",
    "emnist",
    "read_vocab",
    "shakespeare_fedjax",
    "stackoverflow",
    "tokenizer",
]

ENV_VAR = "FATHOM_TUNE_DATA_DIR"
_BUCKET = "https://storage.googleapis.com/gresearch/fedjax"
EMNIST_URL = _BUCKET + "/emnist/federated_emnist_{name}.sqlite"
STACKOVERFLOW_URL = _BUCKET + "/stackoverflow/stackoverflow_{split}.sqlite"
STACKOVERFLOW_VOCAB_URL = _BUCKET + "/stackoverflow/stackoverflow.word_count"
SHAKESPEARE_URL = _BUCKET + "/shakespeare/shakespeare_{split}.sqlite"

PAD, BOS, EOS = 0, 1, 2


def cache_dir_of(cache_dir: str | os.PathLike | None) -> str:
    """The directory the data is read from.

    ``cache_dir`` if given, else ``$FATHOM_TUNE_DATA_DIR`` if set, else
    FedJAX's default (``~/.cache/fedjax``).

    Example:
        >>> cache_dir_of("/data/fedjax")
        '/data/fedjax'
    """
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a str, an os.PathLike or None, got {cache_dir!r}")
        return os.fspath(cache_dir)
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    return fedjax.datasets.downloads.default_cache_dir()


def _require(directory: str, urls: Sequence[str]) -> None:
    """Raises for the first file of ``urls`` not in ``directory`` or not in FedJAX's format.

    ``FileNotFoundError`` for a missing file, ``ValueError`` for an ``.sqlite``
    file that :func:`_format_problem` rejects; both name the file.
    """
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name} is not in the data directory {directory!r} (taken from the "
                f"cache_dir argument, else ${ENV_VAR}, else FedJAX's default). FedJAX "
                f"publishes it at {url} ; download it into that directory "
                f"(e.g. curl -o {path} {url}) on a machine with internet access."
            )
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".sqlite"):
            problem = _format_problem(os.path.join(directory, name))
            if problem is not None:
                raise ValueError(
                    f"{name} in the data directory {directory!r} is not a FedJAX federated "
                    f"SQLite file ({problem}); it may be truncated or corrupted: delete it and "
                    f"download it again from {url}"
                )


_COLUMNS = {"client_id", "data", "num_examples"}


def _format_problem(path: str) -> str | None:
    """Why ``path`` is not in FedJAX's SQLite format, or None.

    FedJAX's format (``fedjax.SQLiteFederatedData``): a table ``federated_data``
    with columns ``client_id``, ``data`` (zlib-compressed msgpack, never
    pickle) and ``num_examples``. The file is opened read-only and the first
    client's data is decoded.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(federated_data)")}
            if not _COLUMNS <= columns:
                return f"no table federated_data with columns {sorted(_COLUMNS)}"
            first = db.execute("SELECT data FROM federated_data LIMIT 1").fetchone()
        if first is None:
            return "its federated_data table has no clients"
        sqlite_federated_data.decompress_and_deserialize(first[0])
    except Exception as exc:  # noqa: BLE001 - sqlite, zlib and msgpack errors alike
        return f"{type(exc).__name__}: {exc}"
    return None


def _carve(
    train: fedjax.FederatedData,
    test: fedjax.FederatedData,
    *,
    seed: int,
    num_validation_clients: int,
    num_test_clients: int | None,
) -> tuple[fedjax.FederatedData, fedjax.FederatedData, fedjax.FederatedData]:
    """(train, validation, test): validation = whole train clients chosen by ``seed``."""
    ids = list(train.client_ids())
    if num_validation_clients >= len(ids):
        raise ValueError(
            f"num_validation_clients={num_validation_clients} leaves no training client of "
            f"the {len(ids)} in the train split; allowed: 1..{len(ids) - 1}"
        )
    rng = np.random.default_rng(seed)
    held = rng.choice(len(ids), size=num_validation_clients, replace=False)
    held_set = set(held.tolist())
    validation = fedjax.SubsetFederatedData(train, [ids[k] for k in held], validate=False)
    train = fedjax.SubsetFederatedData(
        train, [cid for k, cid in enumerate(ids) if k not in held_set], validate=False
    )
    if num_test_clients is not None:
        test_ids = list(test.client_ids())
        if num_test_clients > len(test_ids):
            raise ValueError(
                f"num_test_clients={num_test_clients} exceeds the {len(test_ids)} clients of "
                f"the test split; allowed: 1..{len(test_ids)} or None (all)"
            )
        chosen = rng.choice(len(test_ids), size=num_test_clients, replace=False)
        test = fedjax.SubsetFederatedData(test, [test_ids[k] for k in chosen], validate=False)
    return train, validation, test


def _check_common(seed, num_validation_clients, num_test_clients) -> tuple[int, int, int | None]:
    seed = checks.seed("seed", seed)
    num_val = checks.int_range("num_validation_clients", num_validation_clients, 1)
    if num_test_clients is not None:
        num_test_clients = checks.int_range("num_test_clients", num_test_clients, 1)
    return seed, num_val, num_test_clients


def emnist(
    *,
    cache_dir: str | os.PathLike | None = None,
    only_digits: bool = False,
    seed: int = 0,
    num_validation_clients: int = 100,
    num_test_clients: int | None = None,
) -> Task:
    """Federated EMNIST (FEMNIST-62, or digits only) with FedJAX's CNN.

    Data: ``fedjax.datasets.emnist.load_data`` from
    ``federated_emnist_train.sqlite`` and ``federated_emnist_test.sqlite``
    (``federated_emnist_digitsonly_*`` with ``only_digits``); features ``x``
    float32 ``[n, 28, 28, 1]`` (FedJAX flips the pixels), ``y`` int32, and
    ``domain_id``. 3400 writers in the train split, one per client.
    Model: ``fedjax.models.emnist.create_conv_model`` (two convolutions,
    dropout), eval metrics ``loss`` and ``accuracy``.

    Defaults (the protocol of the FATHOM paper, after Reddi et al. 2021):
    10 clients per round, at most 2000 rounds, evaluation every 10 rounds,
    start ``learning_rate=0.1, local_epochs=1, batch_size=20``. Bounds: the
    upper bounds of the FATHOM paper's code (learning rate 0.5, local epochs
    10, batch size 5096), lower bounds 1e-4, 0.01 and 1.

    Target: accuracy >= 0.86, the paper's target test accuracy (there static
    FedAvg from the default start needs 1098 rounds, FATHOM 739). Not
    measured here: the data cannot be fetched on the machines this package
    was built on.

    Args:
        cache_dir: directory holding the FedJAX files (see :func:`cache_dir_of`).
        only_digits: the 10-class digits-only variant.
        seed: chooses the validation clients (and the test subset).
        num_validation_clients: train clients held out for validation.
        num_test_clients: evaluate on this many test clients; ``None``: all.

    Returns:
        The task.

    Raises:
        FileNotFoundError: a needed file is not in the cache directory.

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.emnist(cache_dir="/data/fedjax")  # doctest: +SKIP
        >>> task.train.num_clients()  # doctest: +SKIP
        3300
    """
    only_digits = checks.boolean("only_digits", only_digits)
    seed, num_val, num_test = _check_common(seed, num_validation_clients, num_test_clients)
    directory = cache_dir_of(cache_dir)
    prefix = "digitsonly_" if only_digits else ""
    _require(directory, [EMNIST_URL.format(name=prefix + split) for split in ("train", "test")])
    train, test = fedjax.datasets.emnist.load_data(only_digits=only_digits, cache_dir=directory)
    train, validation, test = _carve(
        train, test, seed=seed, num_validation_clients=num_val, num_test_clients=num_test
    )
    return Task(
        name="emnist-digits" if only_digits else "emnist",
        train=train,
        validation=validation,
        test=test,
        model=fedjax.models.emnist.create_conv_model(only_digits=only_digits),
        clients_per_round=min(10, train.num_clients()),
        num_rounds=2000,
        eval_every=10,
        target=Target("accuracy", 0.86),
        init_hparams=HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0),
        bounds=Bounds(
            lower=HParams(learning_rate=1e-4, local_epochs=0.01, batch_size=1.0),
            upper=HParams(learning_rate=0.5, local_epochs=10.0, batch_size=5096.0),
        ),
    )


def read_vocab(path: str | os.PathLike, vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent words of a ``stackoverflow.word_count`` file.

    Each line is ``<word> <count>``, most frequent first (what FedJAX's
    ``stackoverflow.default_vocab`` reads).
    """
    vocab = []
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if len(vocab) == vocab_size:
                    break
                fields = line.split()
                if len(fields) != 2:
                    raise ValueError(f"line {number} is {line[:80]!r}, not '<word> <count>'")
                vocab.append(fields[0])
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(
                f"{os.fspath(path)!r} is not a stackoverflow.word_count file ({exc}); it may be "
                f"corrupted: delete it and download it again from {STACKOVERFLOW_VOCAB_URL}"
            ) from None
    if len(vocab) < vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the {len(vocab)} words in {os.fspath(path)!r}"
        )
    return vocab


def tokenizer(vocab: Sequence[str], max_length: int) -> Callable[[dict], dict]:
    """A ``preprocess_batch`` function: ``tokens`` -> padded ``x``, ``y`` word ids.

    The NumPy equivalent of FedJAX's ``StackoverflowTokenizer(vocab,
    num_oov_buckets=1).as_preprocess_batch(max_length)``: split on single
    spaces, ids ``word index + 3`` (OOV: ``len(vocab) + 3``), BOS and EOS
    around each sentence, ``x = ids[:-1]``, ``y = ids[1:]``, truncated or
    padded with 0 to ``max_length``.

    Example:
        >>> fn = tokenizer(["a", "b"], max_length=4)
        >>> out = fn({"tokens": np.array([b"a b c", b"b"], dtype=object)})
        >>> out["x"].tolist(), out["y"].tolist()
        ([[1, 3, 4, 5], [1, 4, 0, 0]], [[3, 4, 5, 2], [4, 2, 0, 0]])
    """
    table = {word.encode("utf-8"): i + 3 for i, word in enumerate(vocab)}
    oov = len(vocab) + 3

    def preprocess_batch(examples):
        tokens = examples["tokens"]
        x = np.zeros((len(tokens), max_length), np.int32)
        y = np.zeros((len(tokens), max_length), np.int32)
        for row, sentence in enumerate(tokens):
            ids = [BOS] + [table.get(w, oov) for w in sentence.split(b" ")] + [EOS]
            n = min(len(ids) - 1, max_length)
            x[row, :n] = ids[:n]
            y[row, :n] = ids[1 : n + 1]
        out = {"x": x, "y": y}
        if "domain_id" in examples:
            out["domain_id"] = examples["domain_id"]
        return out

    return preprocess_batch


def stackoverflow(
    *,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 10000,
    max_length: int = 20,
    seed: int = 0,
    num_validation_clients: int = 100,
    num_test_clients: int | None = None,
) -> Task:
    """Stack Overflow next-word prediction with FedJAX's LSTM.

    Data: ``fedjax.datasets.stackoverflow.load_split`` of
    ``stackoverflow_train.sqlite`` and ``stackoverflow_test.sqlite`` with
    FedJAX's ``preprocess_client``, then tokenized by :func:`tokenizer` with
    the ``vocab_size`` most frequent words of ``stackoverflow.word_count``
    (all three files in the cache directory): ``x``, ``y`` int32
    ``[n, max_length]``. One client per Stack Overflow user.
    Model: ``fedjax.models.stackoverflow.create_lstm_model(vocab_size)``
    (embedding 96, one LSTM layer of 670 units); target metric
    ``accuracy_in_vocab`` (padding and EOS targets excluded, PAD/BOS/EOS/OOV
    predictions count as wrong), as in Reddi et al. 2021.

    Defaults (the FATHOM paper's protocol): 50 clients per round, at most
    1500 rounds, evaluation every 10 rounds, start ``learning_rate=0.32,
    local_epochs=1, batch_size=16``. Bounds: upper bounds of the paper's code
    (learning rate 1.0, local epochs 10, batch size 5096), lower bounds
    1e-4, 0.01 and 1.

    Target: ``accuracy_in_vocab`` >= 0.23, the paper's target (static FedAvg
    971 rounds, FATHOM 562). Not measured here (no offline copy of the data).

    Args:
        cache_dir: directory holding the FedJAX files (see :func:`cache_dir_of`).
        vocab_size: words in the vocabulary (>= 1).
        max_length: words per padded sequence (>= 1).
        seed: chooses the validation clients (and the test subset).
        num_validation_clients: train clients held out for validation.
        num_test_clients: evaluate on this many test clients; ``None``: all
            (FedJAX's test split is large; a few thousand is usual).

    Returns:
        The task.

    Raises:
        FileNotFoundError: a needed file is not in the cache directory.

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.stackoverflow(num_test_clients=1000)  # doctest: +SKIP
    """
    vocab_size = checks.int_range("vocab_size", vocab_size, 1)
    max_length = checks.int_range("max_length", max_length, 1)
    seed, num_val, num_test = _check_common(seed, num_validation_clients, num_test_clients)
    directory = cache_dir_of(cache_dir)
    _require(
        directory,
        [STACKOVERFLOW_URL.format(split=s) for s in ("train", "test")] + [STACKOVERFLOW_VOCAB_URL],
    )
    vocab = read_vocab(os.path.join(directory, "stackoverflow.word_count"), vocab_size)
    so = fedjax.datasets.stackoverflow
    preprocess_batch = tokenizer(vocab, max_length)

    def load(split):
        fd = so.load_split(split, cache_dir=directory)
        return fd.preprocess_client(so.preprocess_client).preprocess_batch(preprocess_batch)

    train, validation, test = _carve(
        load("train"),
        load("test"),
        seed=seed,
        num_validation_clients=num_val,
        num_test_clients=num_test,
    )
    return Task(
        name="stackoverflow",
        train=train,
        validation=validation,
        test=test,
        model=fedjax.models.stackoverflow.create_lstm_model(vocab_size=vocab_size),
        clients_per_round=min(50, train.num_clients()),
        num_rounds=1500,
        eval_every=10,
        target=Target("accuracy_in_vocab", 0.23),
        init_hparams=HParams(learning_rate=0.32, local_epochs=1.0, batch_size=16.0),
        bounds=Bounds(
            lower=HParams(learning_rate=1e-4, local_epochs=0.01, batch_size=1.0),
            upper=HParams(learning_rate=1.0, local_epochs=10.0, batch_size=5096.0),
        ),
    )


def shakespeare_fedjax(
    *,
    cache_dir: str | os.PathLike | None = None,
    sequence_length: int = 80,
    seed: int = 0,
    num_validation_clients: int = 50,
    num_test_clients: int | None = None,
) -> Task:
    """FedJAX's federated Shakespeare (TFF's split) with FedJAX's character LSTM.

    Data: ``fedjax.datasets.shakespeare.load_split`` of
    ``shakespeare_train.sqlite`` and ``shakespeare_test.sqlite`` with
    FedJAX's ``preprocess_client`` (``x``, ``y`` int32
    ``[n, sequence_length]``). 715 roles in the train split. Model:
    ``fedjax.models.shakespeare.create_lstm_model()`` (embedding 8, two LSTM
    layers of 256 units). For the same task on data that ships with this
    package, see :func:`fathom_tune.tasks.shakespeare`.

    Defaults (Reddi et al. 2021's Shakespeare setting): 10 clients per round,
    1200 rounds, evaluation every 10 rounds, start ``learning_rate=1.0,
    local_epochs=1, batch_size=4``. Bounds: learning rate [1e-4, 10], local
    epochs [0.01, 10], batch size [1, 256].

    Target: ``accuracy_in_vocab`` >= 0.56, a little below the 56.9% test
    accuracy of FedAvg reported by Reddi et al. 2021 (Table 2). Not measured
    here (no offline copy of the data).

    Args:
        cache_dir: directory holding the FedJAX files (see :func:`cache_dir_of`).
        sequence_length: characters per sequence (>= 1).
        seed: chooses the validation clients (and the test subset).
        num_validation_clients: train clients held out for validation.
        num_test_clients: evaluate on this many test clients; ``None``: all.

    Returns:
        The task.

    Raises:
        FileNotFoundError: a needed file is not in the cache directory.

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.shakespeare_fedjax()  # doctest: +SKIP
    """
    sequence_length = checks.int_range("sequence_length", sequence_length, 1)
    seed, num_val, num_test = _check_common(seed, num_validation_clients, num_test_clients)
    directory = cache_dir_of(cache_dir)
    _require(directory, [SHAKESPEARE_URL.format(split=s) for s in ("train", "test")])
    shk = fedjax.datasets.shakespeare
    preprocess = functools.partial(shk.preprocess_client, sequence_length=sequence_length)
    train, validation, test = _carve(
        shk.load_split("train", cache_dir=directory).preprocess_client(preprocess),
        shk.load_split("test", cache_dir=directory).preprocess_client(preprocess),
        seed=seed,
        num_validation_clients=num_val,
        num_test_clients=num_test,
    )
    return Task(
        name="shakespeare-fedjax",
        train=train,
        validation=validation,
        test=test,
        model=fedjax.models.shakespeare.create_lstm_model(),
        clients_per_round=min(10, train.num_clients()),
        num_rounds=1200,
        eval_every=10,
        target=Target("accuracy_in_vocab", 0.56),
        init_hparams=HParams(learning_rate=1.0, local_epochs=1.0, batch_size=4.0),
        bounds=Bounds(
            lower=HParams(learning_rate=1e-4, local_epochs=0.01, batch_size=1.0),
            upper=HParams(learning_rate=10.0, local_epochs=10.0, batch_size=256.0),
        ),
    )
