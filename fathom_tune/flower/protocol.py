"""What FATHOM's server and clients exchange in Flower messages, and the converters.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
needs nothing beyond what FedAvg already sends. In Flower's Message API a
training round carries:

* server to client, in the message's ``ConfigRecord`` (key ``"config"``):
  :data:`LEARNING_RATE` (eta), :data:`LOCAL_EPOCHS` (E) and
  :data:`BATCH_SIZE` (B) as real numbers, :data:`ROUND` (the 0-based round
  of the whole run, also after a resume) and Flower's own
  ``"server-round"``; the model in its ``ArrayRecord`` (key ``"arrays"``);
* client to server, in its ``MetricRecord`` (key ``"metrics"``):
  :data:`NUM_EXAMPLES` (``n_i``, the weight of FedAvg and of ``G``),
  :data:`PHI` (``phi_i = min_k cos(g_k, x0 - x_{k+1})``),
  :data:`TRAIN_LOSS` (the mean minibatch loss of its local steps) and
  :data:`LOCAL_STEPS` (``K_i``); its trained model ``x_{K_i}`` in its
  ``ArrayRecord``.

Models travel as named arrays: :func:`to_array_record` names each leaf of a
JAX pytree by its path (``"linear/w"``), :func:`from_array_record` rebuilds
the pytree and checks every name, shape and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord

from fathom_tune.hparams import HParams

__all__ = [
    "ARRAYS",
    "BATCH_SIZE",
    "CONFIG",
    "LEARNING_RATE",
    "LOCAL_EPOCHS",
    "LOCAL_STEPS",
    "METRICS",
    "NUM_EXAMPLES",
    "PHI",
    "REPLY_METRICS",
    "ROUND",
    "TRAIN_LOSS",
    "from_array_record",
    "hparams_to_config",
    "leaf_names",
    "numpy_arrays",
    "read_reply",
    "read_train_config",
    "to_array_record",
]

ARRAYS = "arrays"
"""Key of the model's ``ArrayRecord`` in both directions (Flower's default)."""
CONFIG = "config"
"""Key of the round's ``ConfigRecord`` (Flower's default)."""
METRICS = "metrics"
"""Key of a reply's ``MetricRecord``."""

LEARNING_RATE = "learning-rate"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
ROUND = "fathom-round"
"""The round's 0-based index in the whole run (Flower's ``server-round`` restarts at 1
when a run resumes)."""

NUM_EXAMPLES = "num-examples"
"""``n_i``: the client's training examples; FedAvg's weight key."""
PHI = "phi"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
REPLY_METRICS = (NUM_EXAMPLES, PHI, TRAIN_LOSS, LOCAL_STEPS)
"""The metrics every FATHOM client reply holds (and FedAvg requires identical keys)."""

_HPARAM_KEYS = {
    "learning_rate": LEARNING_RATE,
    "local_epochs": LOCAL_EPOCHS,
    "batch_size": BATCH_SIZE,
}


def hparams_to_config(hparams: HParams, round_index: int) -> dict[str, float | int]:
    """The round's entries of the ``ConfigRecord`` sent to every sampled client.

    Example:
        >>> hparams_to_config(HParams(0.1, 1.0, 20.0), 3)
        {'learning-rate': 0.1, 'local-epochs': 1.0, 'batch-size': 20.0, 'fathom-round': 3}
    """
    if not isinstance(hparams, HParams):
        raise TypeError(f"hparams must be an HParams, got {hparams!r}")
    out: dict[str, float | int] = {
        key: float(getattr(hparams, n)) for n, key in _HPARAM_KEYS.items()
    }
    out[ROUND] = int(round_index)
    return out


def read_train_config(config: Mapping[str, Any]) -> tuple[HParams, int]:
    """The round's hyperparameters and 0-based round index from a training message's config.

    Args:
        config: ``message.content["config"]`` (a ``ConfigRecord``) or any mapping.

    Returns:
        ``(hparams, round_index)``.

    Raises:
        ValueError: a key is missing or holds a value that is not allowed; the
            message names the key, the value and what is allowed (the server
            is then not a FATHOM strategy, or another version).

    Example:
        >>> hp, r = read_train_config({"learning-rate": 0.1, "local-epochs": 1.0,
        ...                             "batch-size": 20.0, "fathom-round": 0})
        >>> hp.batch_int, r
        (20, 0)
    """
    missing = [k for k in (*_HPARAM_KEYS.values(), ROUND) if k not in config]
    if missing:
        raise ValueError(
            f"the training config lacks {missing} (it holds {sorted(config)}); a FATHOM "
            "client needs a server running fathom_tune.flower.FathomFedAvg"
        )
    values = {}
    for name, key in _HPARAM_KEYS.items():
        value = config[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(f"config[{key!r}] must be a finite number > 0, got {value!r}")
        values[name] = float(value)
    round_index = config[ROUND]
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"config[{ROUND!r}] must be an int >= 0, got {round_index!r}")
    return HParams(**values), round_index


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(tree) -> list[str]:
    """The name of every leaf of ``tree``: its path joined by ``/``, in leaf order.

    Example:
        >>> import numpy as np
        >>> leaf_names({"linear": {"w": np.zeros(2), "b": np.zeros(1)}, "scale": [np.ones(1)]})
        ['linear/b', 'linear/w', 'scale/0']
    """
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = ["/".join(_key_name(k) for k in path) or "0" for path, _ in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"the pytree's leaf names are not unique: {names}")
    return names


def to_array_record(tree) -> ArrayRecord:
    """A pytree of arrays (JAX, NumPy) as an ``ArrayRecord`` named by :func:`leaf_names`.

    Example:
        >>> import numpy as np
        >>> sorted(to_array_record({"w": np.zeros((2, 3), np.float32)}).keys())
        ['w']
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return ArrayRecord(
        {name: Array(np.asarray(leaf)) for name, leaf in zip(leaf_names(tree), leaves)}
    )


def numpy_arrays(record: ArrayRecord, *, floating: bool = False) -> dict[str, np.ndarray]:
    """An ``ArrayRecord`` as ``{name: numpy array}`` (the server's view of a model).

    Raises:
        TypeError: ``record`` is not an ``ArrayRecord``, or ``floating`` and
            an array is not floating point (FATHOM averages model updates).
    """
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"expected a flwr.app.ArrayRecord, got {type(record).__name__}")
    arrays = {name: array.numpy() for name, array in record.items()}
    for name, value in arrays.items() if floating else ():
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(
                f"array {name!r} has dtype {value.dtype}; FATHOM averages model updates, so "
                "every array of the model must be floating point"
            )
    return arrays


def from_array_record(record: ArrayRecord | Mapping[str, np.ndarray], like):
    """Rebuilds a pytree shaped like ``like`` from named arrays.

    Args:
        record: an ``ArrayRecord`` (or ``{name: array}``) written by
            :func:`to_array_record` for the same model.
        like: a pytree with the model's structure, shapes and dtypes (e.g.
            ``model.init(key)`` or its ``jax.eval_shape``).

    Returns:
        The pytree with NumPy leaves.

    Raises:
        ValueError: names are missing or extra, or a shape or dtype differs;
            the message names them.
    """
    arrays = numpy_arrays(record) if isinstance(record, ArrayRecord) else dict(record)
    names = leaf_names(like)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    missing = sorted(set(names) - set(arrays))
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise ValueError(
            f"the arrays do not match the model: missing {missing}, unexpected {extra}"
        )
    out = []
    for name, leaf in zip(names, leaves):
        value = arrays[name]
        shape, dtype = (
            tuple(np.shape(leaf)),
            np.dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype),
        )
        if value.shape != shape or value.dtype != dtype:
            raise ValueError(
                f"array {name!r} is {value.dtype}{list(value.shape)}; the model needs "
                f"{dtype}{list(shape)}"
            )
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def read_reply(content, x0: Mapping[str, np.ndarray], node: int) -> tuple[dict, dict]:
    """A FATHOM client's reply as ``(arrays, metrics)``, checked against the model sent.

    Args:
        content: the reply's ``RecordDict``.
        x0: the model sent, ``{name: array}``.
        node: the replying node's id (for messages).

    Raises:
        ValueError: a record, a metric or an array is missing or does not
            match; the message names the node and what is wrong.
    """
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise ValueError(
            f"node {node}'s reply holds array records {sorted(content.array_records)} and metric "
            f"records {sorted(content.metric_records)}; a FATHOM client replies with {ARRAYS!r} "
            f"and {METRICS!r} (fathom_tune.flower.train_reply)"
        )
    metrics = dict(content.metric_records[METRICS])
    missing = [k for k in REPLY_METRICS if k not in metrics]
    if missing:
        raise ValueError(f"node {node}'s metrics lack {missing}; got {sorted(metrics)}")
    if not metrics[NUM_EXAMPLES] > 0:
        raise ValueError(
            f"node {node} reported {NUM_EXAMPLES}={metrics[NUM_EXAMPLES]!r}; must be > 0"
        )
    arrays = numpy_arrays(content.array_records[ARRAYS])
    wrong = sorted(set(arrays) ^ set(x0)) or [
        k for k, v in x0.items() if arrays[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"node {node} returned arrays that do not match the model sent: {wrong}")
    return arrays, metrics
