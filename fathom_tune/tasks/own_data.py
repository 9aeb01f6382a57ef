"""Your own data in one mapping: hold out whole validation and test clients, then build a task.

Tuning decisions of FATHOM ("Federated Hypergradient Descent", A. K. Kan,
arXiv 2211.02106) are measured on validation clients and the final report
on test clients, both unseen in training: here they are whole clients drawn
from the one mapping ``client id -> (x, y)`` you have.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from fathom_tune import checks
from fathom_tune.task import Task
from fathom_tune.tasks import _common
from fathom_tune.tasks.arrays import from_arrays

__all__ = ["from_clients", "holdout_clients"]


def holdout_clients(
    clients: Mapping, *, validation_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict, dict, dict]:
    """Splits ``clients`` into training, validation and test clients, whole clients each.

    The client ids, sorted by their UTF-8 bytes (so the split does not depend
    on the mapping's order), are shuffled with ``numpy.random.default_rng(seed)``;
    the first ``max(1, round(validation_fraction * n))`` become validation
    clients, the next ``max(1, round(test_fraction * n))`` test clients and
    the rest, at least one, training clients. Ids and values are passed
    through unchanged; each returned mapping lists its ids in sorted order.

    Args:
        clients: ``{client_id: (x, y)}``, ids ``str`` or ``bytes``; at least 3.
        validation_fraction: share of the clients held out for validation, in (0, 1).
        test_fraction: share held out for testing, in (0, 1); the two sum to < 1.
        seed: the shuffle's seed.

    Returns:
        ``(train, validation, test)``, three disjoint dicts that together are ``clients``.

    Raises:
        TypeError: ``clients`` is not a mapping, an id is not ``str`` or
            ``bytes``, or an argument has the wrong type.
        ValueError: fewer than 3 clients, the same id as ``str`` and as
            ``bytes``, a fraction outside (0, 1), fractions that leave no
            training client, or a negative seed.

    Example:
        >>> clients = {f"user{i}": None for i in range(10)}
        >>> train, validation, test = holdout_clients(clients, seed=1)
        >>> len(train), len(validation), len(test)
        (6, 2, 2)
    """
    if not isinstance(clients, Mapping):
        raise TypeError(
            f"clients must be a mapping client id -> (x, y), got {type(clients).__name__}"
        )
    seed = checks.seed("seed", seed)
    _common.check_fractions(validation_fraction, test_fraction)
    if len(clients) < 3:
        raise ValueError(
            f"clients has {len(clients)} clients; holding out whole validation and test clients "
            "needs at least 3 (1 training, 1 validation, 1 test)"
        )
    _, num_val, num_test = _common.holdout_counts(len(clients), validation_fraction, test_fraction)
    ids = sorted(clients, key=_id_bytes)
    for a, b in itertools.pairwise(ids):
        if _id_bytes(a) == _id_bytes(b):
            raise ValueError(
                f"clients: client id {_id_bytes(a)!r} given twice (as str and as bytes)"
            )
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.split(order, [num_val, num_val + num_test])
    validation, test, train = ({ids[i]: clients[ids[i]] for i in sorted(p)} for p in parts)
    return train, validation, test


def from_clients(
    name: str,
    clients: Mapping,
    *,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    **options,
) -> Task:
    """A task over one mapping ``client id -> (x, y)``: the shortest way to your own data.

    Holds out validation and test clients with :func:`holdout_clients`, then
    builds the task with :func:`fathom_tune.tasks.from_arrays`, whose
    defaults pick the model (an MLP for ``x`` of shape ``(n, d)``, a small
    CNN for images), the start, the bounds, the clients per round and the
    target from the data; ``options`` overrides any of them.

    Args:
        name: the task's name (no ``/``), used in study names.
        clients: ``{client_id: (x, y)}``, at least 3 clients.
        validation_fraction: share of the clients held out for validation.
        test_fraction: share of the clients held out for testing.
        seed: the seed of the hold-out shuffle (training seeds are passed to
            the tuner, e.g. ``fathom_tune.optimize(task, seed=...)``).
        **options: keyword arguments of :func:`~fathom_tune.tasks.from_arrays`:
            ``model``, ``clients_per_round``, ``num_rounds``, ``eval_every``,
            ``target``, ``init_hparams``, ``bounds``, ``num_classes``.

    Returns:
        The task.

    Raises:
        TypeError, ValueError: as :func:`holdout_clients` and
            :func:`~fathom_tune.tasks.from_arrays`.

    Example:
        >>> import fathom_tune, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> clients = {f"user{i}": (rng.normal(size=(40, 8)), rng.integers(0, 3, 40))
        ...            for i in range(30)}
        >>> task = fathom_tune.tasks.from_clients("mine", clients)
        >>> task.train.num_clients(), task.validation.num_clients(), task.clients_per_round
        (18, 6, 10)
        >>> task.init_hparams
        HParams(learning_rate=0.1, local_epochs=1.0, batch_size=8.0)
    """
    train, validation, test = holdout_clients(
        clients, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed
    )
    return from_arrays(name, train, validation, test, **options)


def _id_bytes(cid) -> bytes:
    if isinstance(cid, str):
        return cid.encode("utf-8")
    if isinstance(cid, bytes):
        return cid
    raise TypeError(f"clients: client id {cid!r} is a {type(cid).__name__}; allowed: str or bytes")
