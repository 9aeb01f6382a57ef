"""A task over your own arrays: client id -> (x, y), with any FedJAX model."""

from __future__ import annotations

from collections.abc import Mapping

import fedjax
import jax
import numpy as np

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task
from fathom_tune.tasks import _common

__all__ = ["from_arrays"]

_SPLITS = ("train", "validation", "test")


def from_arrays(
    name: str,
    train: Mapping,
    validation: Mapping,
    test: Mapping,
    *,
    model: fedjax.Model,
    clients_per_round: int,
    num_rounds: int = 100,
    eval_every: int = 5,
    target: Target,
    init_hparams: HParams,
    bounds: Bounds,
    num_classes: int | None = None,
) -> Task:
    """Builds a :class:`~fathom_tune.Task` from per-client arrays.

    Each split maps a client id (``str`` or ``bytes``; ``str`` is encoded as
    UTF-8, FedJAX uses ``bytes``) to a pair ``(x, y)`` of arrays with one row
    per example. Floating features become float32, integer ones (e.g. token
    ids) int32. Integer labels are class indices and must lie in
    ``[0, num_classes)``; ``num_classes`` defaults to the last dimension of
    the model's output on one example. Floating labels (regression) become
    float32 and must be finite. All clients of all splits must have the same
    per-example shapes of ``x`` and of ``y``.

    Args:
        name: the task's name (no ``/``), used in study names.
        train: training clients, ``{client_id: (x, y)}``.
        validation: clients used for tuning decisions.
        test: clients used only for the final report.
        model: any ``fedjax.Model`` whose ``apply_for_eval`` takes
            ``{'x': x, 'y': y}`` batches.
        clients_per_round: clients sampled each round (<= training clients).
        num_rounds: default length of one training run.
        eval_every: evaluate on validation every this many rounds.
        target: the quality to reach, a metric of ``model.eval_metrics``.
        init_hparams: the default start.
        bounds: bounds of the hyperparameters, containing ``init_hparams``.
        num_classes: number of classes of integer labels; ``None``: inferred
            from the model.

    Returns:
        The task, data held as ``fedjax.InMemoryFederatedData``.

    Raises:
        TypeError: a split is not a mapping, a client id is not ``str`` or
            ``bytes``, a value is not an ``(x, y)`` pair, or an array has an
            unsupported dtype.
        ValueError: a split has no clients, a client has no examples, ``x``
            and ``y`` differ in length, features are not finite, labels are
            out of range, or shapes differ between clients (each message
            names the split and client).

    Example:
        >>> import fathom_tune, fedjax, haiku as hk, numpy as np
        >>> model = fedjax.create_model_from_haiku(
        ...     transformed_forward_pass=hk.transform(lambda b: hk.Linear(3)(b["x"])),
        ...     sample_batch={"x": np.zeros((1, 4), np.float32), "y": np.zeros((1,), np.int32)},
        ...     train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
        ...     eval_metrics={"accuracy": fedjax.metrics.Accuracy()})
        >>> rng = np.random.default_rng(0)
        >>> def client(n):
        ...     return rng.normal(size=(n, 4)), rng.integers(0, 3, n)
        >>> task = fathom_tune.tasks.from_arrays(
        ...     "toy", {"a": client(10), "b": client(7)}, {"c": client(5)}, {"d": client(5)},
        ...     model=model, clients_per_round=2, target=fathom_tune.Target("accuracy", 0.5),
        ...     init_hparams=fathom_tune.HParams(0.1, 1.0, 4.0),
        ...     bounds=fathom_tune.Bounds(fathom_tune.HParams(1e-3, 0.1, 1.0),
        ...                               fathom_tune.HParams(1.0, 10.0, 64.0)))
        >>> task.train.num_clients(), sorted(task.train.client_ids())
        (2, [b'a', b'b'])
    """
    if not isinstance(model, fedjax.Model):
        raise TypeError(f"model must be a fedjax.Model, got {type(model).__name__}")
    splits = {
        split: _convert_split(split, data)
        for split, data in zip(_SPLITS, (train, validation, test))
    }
    _check_shapes(splits)
    first_id, first = next(iter(splits["train"].items()))
    if num_classes is None:
        num_classes = _infer_num_classes(model, first_id, first)
    else:
        num_classes = checks.positive_int("num_classes", num_classes)
    for split, clients in splits.items():
        for cid, examples in clients.items():
            _check_labels(f"{split}[{cid!r}]", examples["y"], num_classes)
    return Task(
        name=name,
        train=_common.in_memory(splits["train"]),
        validation=_common.in_memory(splits["validation"]),
        test=_common.in_memory(splits["test"]),
        model=model,
        clients_per_round=clients_per_round,
        num_rounds=num_rounds,
        eval_every=eval_every,
        target=target,
        init_hparams=init_hparams,
        bounds=bounds,
    )


def _convert_split(split: str, data) -> dict[bytes, dict[str, np.ndarray]]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{split} must be a mapping client id -> (x, y), got {type(data).__name__}")
    if not data:
        raise ValueError(f"{split} has no clients; at least one client is required")
    out: dict[bytes, dict[str, np.ndarray]] = {}
    for raw_id, value in data.items():
        if isinstance(raw_id, str):
            cid = raw_id.encode("utf-8")
        elif isinstance(raw_id, bytes):
            cid = raw_id
        else:
            raise TypeError(
                f"{split}: client id {raw_id!r} is a {type(raw_id).__name__}; allowed: str or bytes"
            )
        where = f"{split}[{cid!r}]"
        if cid in out:
            raise ValueError(f"{where}: client id given twice (as str and as bytes)")
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{where} must be a pair (x, y), got {type(value).__name__}")
        x = _as_array(f"{where} x", value[0])
        y = _as_array(f"{where} y", value[1])
        if len(x) == 0:
            raise ValueError(f"{where} has 0 examples; every client needs >= 1")
        if len(x) != len(y):
            raise ValueError(
                f"{where}: x has {len(x)} rows but y has {len(y)}; one label row per example"
            )
        if np.issubdtype(x.dtype, np.floating):
            _check_finite(f"{where} x (features)", x)
        out[cid] = {"x": x, "y": y}
    return out


def _as_array(what: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 0:
        raise ValueError(f"{what} must have one row per example, got a scalar {array!r}")
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int32)
    raise TypeError(f"{what} has dtype {array.dtype}; allowed: floating or integer numbers")


def _check_finite(what: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        values = np.ravel(array[row])
        raise ValueError(
            f"{what}: {int(bad.sum())} non-finite values (NaN or inf), the first in example "
            f"{row} ({float(values[~np.isfinite(values)][0])!r}); all values must be finite"
        )


def _check_shapes(splits) -> None:
    ref_split, ref_clients = "train", splits["train"]
    ref_id, ref = next(iter(ref_clients.items()))
    for split, clients in splits.items():
        for cid, examples in clients.items():
            for key in ("x", "y"):
                if examples[key].shape[1:] != ref[key].shape[1:]:
                    raise ValueError(
                        f"{split}[{cid!r}]: {key} has per-example shape "
                        f"{examples[key].shape[1:]}, but {ref_split}[{ref_id!r}] has "
                        f"{ref[key].shape[1:]}; all clients must share one shape"
                    )


def _infer_num_classes(model: fedjax.Model, cid: bytes, examples) -> int:
    batch = {"x": examples["x"][:1], "y": examples["y"][:1]}
    try:
        preds = model.apply_for_eval(model.init(jax.random.PRNGKey(0)), batch)
    except Exception as e:  # any failure of the user's model: say where it came from
        raise ValueError(
            f"model.apply_for_eval failed on one example of train[{cid!r}] "
            f"(x shape {batch['x'].shape}, dtype {batch['x'].dtype}): {e}"
        ) from e
    return int(np.shape(preds)[-1])


def _check_labels(where: str, y: np.ndarray, num_classes: int) -> None:
    if np.issubdtype(y.dtype, np.floating):
        _check_finite(f"{where} y (regression labels)", y)
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{where} y: label {bad} is outside [0, {num_classes}) (num_classes="
            f"{num_classes}); allowed labels: 0..{num_classes - 1}"
        )
