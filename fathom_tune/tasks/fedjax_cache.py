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

This module holds what the three builders share (the cache directory, the
file checks, the validation clients); the builders are
:mod:`~fathom_tune.tasks.emnist`, :mod:`~fathom_tune.tasks.stackoverflow`
and :mod:`~fathom_tune.tasks.shakespeare_fedjax`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence

import fedjax
import numpy as np
from fedjax.core import sqlite_federated_data

from fathom_tune import checks

__all__ = [
    "EMNIST_URL",
    "ENV_VAR",
    "SHAKESPEARE_URL",
    "STACKOVERFLOW_URL",
    "STACKOVERFLOW_VOCAB_URL",
    "cache_dir_of",
    "carve_validation",
    "check_common",
    "require_files",
]

ENV_VAR = "FATHOM_TUNE_DATA_DIR"
_BUCKET = "https://storage.googleapis.com/gresearch/fedjax"
EMNIST_URL = _BUCKET + "/emnist/federated_emnist_{name}.sqlite"
STACKOVERFLOW_URL = _BUCKET + "/stackoverflow/stackoverflow_{split}.sqlite"
STACKOVERFLOW_VOCAB_URL = _BUCKET + "/stackoverflow/stackoverflow.word_count"
SHAKESPEARE_URL = _BUCKET + "/shakespeare/shakespeare_{split}.sqlite"


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


def require_files(directory: str, urls: Sequence[str]) -> None:
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


def carve_validation(
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


def check_common(seed, num_validation_clients, num_test_clients) -> tuple[int, int, int | None]:
    """The builders' shared arguments, checked: ``(seed, num_validation_clients, num_test_clients)``."""
    seed = checks.seed("seed", seed)
    num_val = checks.int_range("num_validation_clients", num_validation_clients, 1)
    if num_test_clients is not None:
        num_test_clients = checks.int_range("num_test_clients", num_test_clients, 1)
    return seed, num_val, num_test_clients
