"""Stack Overflow next-word prediction from the FedJAX cache (see
:mod:`fathom_tune.tasks.fedjax_cache`), tokenized here.

FedJAX's tokenizer (``StackoverflowTokenizer``) needs
TensorFlow and reads its vocabulary from ``gs://``; this module reads the
same vocabulary file (``stackoverflow.word_count``) from the cache directory
and tokenizes with NumPy, with the same ids as FedJAX's tokenizer with one
OOV bucket: 0 PAD, 1 BOS, 2 EOS, word ``i`` of the vocabulary ``i + 3``,
out-of-vocabulary ``vocab_size + 3``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import fedjax
import numpy as np

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task
from fathom_tune.tasks.fedjax_cache import (
    STACKOVERFLOW_URL,
    STACKOVERFLOW_VOCAB_URL,
    cache_dir_of,
    carve_validation,
    check_common,
    require_files,
)

__all__ = ["read_vocab", "stackoverflow", "tokenizer"]

PAD, BOS, EOS = 0, 1, 2


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
        cache_dir: directory holding the FedJAX files (see :func:`~fathom_tune.tasks.fedjax_cache.cache_dir_of`).
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
    seed, num_val, num_test = check_common(seed, num_validation_clients, num_test_clients)
    directory = cache_dir_of(cache_dir)
    require_files(
        directory,
        [STACKOVERFLOW_URL.format(split=s) for s in ("train", "test")] + [STACKOVERFLOW_VOCAB_URL],
    )
    vocab = read_vocab(os.path.join(directory, "stackoverflow.word_count"), vocab_size)
    so = fedjax.datasets.stackoverflow
    preprocess_batch = tokenizer(vocab, max_length)

    def load(split):
        fd = so.load_split(split, cache_dir=directory)
        return fd.preprocess_client(so.preprocess_client).preprocess_batch(preprocess_batch)

    train, validation, test = carve_validation(
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
