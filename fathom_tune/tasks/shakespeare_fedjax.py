"""FedJAX's federated Shakespeare from the FedJAX cache (see :mod:`fathom_tune.tasks.fedjax_cache`)."""

from __future__ import annotations

import functools
import os

import fedjax

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task
from fathom_tune.tasks.fedjax_cache import (
    SHAKESPEARE_URL,
    cache_dir_of,
    carve_validation,
    check_common,
    require_files,
)

__all__ = ["shakespeare_fedjax"]


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
        cache_dir: directory holding the FedJAX files (see :func:`~fathom_tune.tasks.fedjax_cache.cache_dir_of`).
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
    seed, num_val, num_test = check_common(seed, num_validation_clients, num_test_clients)
    directory = cache_dir_of(cache_dir)
    require_files(directory, [SHAKESPEARE_URL.format(split=s) for s in ("train", "test")])
    shk = fedjax.datasets.shakespeare
    preprocess = functools.partial(shk.preprocess_client, sequence_length=sequence_length)
    train, validation, test = carve_validation(
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
