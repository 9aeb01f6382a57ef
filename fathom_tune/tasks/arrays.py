"""A task over your own arrays: client id -> (x, y), with a ready model or any FedJAX model.

The defaults (model, start, bounds, target) let FATHOM ("Federated
Hypergradient Descent", A. K. Kan, arXiv 2211.02106) tune FedAvg's client
learning rate, local epochs and batch size on data it has never seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import fedjax
import jax
import numpy as np

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.task import Target, Task
from fathom_tune.tasks import _common
from fathom_tune.tasks.models import ready_model

__all__ = ["from_arrays"]

_SPLITS = ("train", "validation", "test")

# The defaults, explained in from_arrays' docstring.
DEFAULT_LEARNING_RATE = 0.1
DEFAULT_LOCAL_EPOCHS = 1.0
STEPS_PER_EPOCH = 5
MAX_DEFAULT_BATCH = 64
MAX_CLIENTS_PER_ROUND = 10
LEARNING_RATE_BOUNDS = (1e-4, 10.0)
LOCAL_EPOCHS_BOUNDS = (0.01, 10.0)


def from_arrays(
    name: str,
    train: Mapping,
    validation: Mapping,
    test: Mapping,
    *,
    model: fedjax.Model | None = None,
    clients_per_round: int | None = None,
    num_rounds: int = 100,
    eval_every: int = 5,
    target: Target | None = None,
    init_hparams: HParams | None = None,
    bounds: Bounds | None = None,
    num_classes: int | None = None,
) -> Task:
    """Builds a :class:`~fathom_tune.Task` from per-client arrays.

    Each split maps a client id (``str`` or ``bytes``; ``str`` is encoded as
    UTF-8, FedJAX uses ``bytes``) to a pair ``(x, y)`` of arrays with one row
    per example. Floating features become float32, integer ones (e.g. token
    ids) int32. Integer labels are class indices and must lie in
    ``[0, num_classes)``. Floating labels (regression) become float32 and
    must be finite. All clients of all splits must have the same per-example
    shapes of ``x`` and of ``y``, and labels of one kind (integer or floating).
    To hold out validation and test clients from one mapping, use
    :func:`fathom_tune.tasks.from_clients`.

    Every argument after the splits has a default, worked out from the
    training clients' sizes ``n_i`` and the labels:

    * ``model``: :func:`fathom_tune.tasks.ready_model` for one example's
      shape: an MLP for ``x`` of shape ``(n, d)``, a small CNN for images
      ``(n, h, w)`` or ``(n, h, w, c)``; a classifier (metrics ``accuracy``
      and ``loss``) for integer labels, a regressor (metric ``loss``, the
      mean squared error) for floating ones.
    * ``num_classes``: the largest integer label + 1, over all splits (with
      your own ``model``: the size of its output's last dimension).
    * ``init_hparams``: ``learning_rate=0.1``, ``local_epochs=1``,
      ``batch_size = min(max(round_half_up(median(n_i) / 5), 1), 64)``:
      about five SGD steps per local epoch on a typical client, enough local
      work for FedAvg to gain over one full-batch step, with room for FATHOM
      to move the batch size both ways; 64 keeps it a minibatch on large
      clients; 0.1 is a common SGD start for small networks (the FEMNIST
      start of the FATHOM paper). Clipped into ``bounds`` when you give them.
    * ``bounds``: learning rate ``[1e-4, 10]`` (the whole usual sweep),
      local epochs ``[0.01, 10]`` (one step up to ten epochs), batch size
      ``[1, max(n_i)]`` (a batch larger than the largest client would only
      repeat its examples).
    * ``clients_per_round``: ``min(10, number of training clients)``.
    * ``target``: halve the validation error of the best constant
      prediction. Classification: accuracy ``>= (1 + m) / 2``, where ``m``
      is the share of the most common label among the validation examples
      (three balanced classes: about 0.67). Regression (ready model only):
      ``loss <= v / 2``, where ``v`` is the variance of the validation
      labels (averaged over a label's entries), i.e. R^2 >= 0.5. With your
      own model, a default target needs an ``accuracy`` metric and integer
      labels; otherwise pass ``target``.

    Args:
        name: the task's name (no ``/``), used in study names.
        train: training clients, ``{client_id: (x, y)}``.
        validation: clients used for tuning decisions.
        test: clients used only for the final report.
        model: any ``fedjax.Model`` whose ``apply_for_eval`` takes
            ``{'x': x, 'y': y}`` batches; ``None``: the ready model.
        clients_per_round: clients sampled each round (<= training clients).
        num_rounds: default length of one training run.
        eval_every: evaluate on validation every this many rounds.
        target: the quality to reach, a metric of ``model.eval_metrics``.
        init_hparams: the default start, within ``bounds``.
        bounds: bounds of the hyperparameters, containing ``init_hparams``.
        num_classes: number of classes of integer labels.

    Returns:
        The task, data held as ``fedjax.InMemoryFederatedData``.

    Raises:
        TypeError: a split is not a mapping, a client id is not ``str`` or
            ``bytes``, a value is not an ``(x, y)`` pair, an array has an
            unsupported dtype, or an argument has the wrong type.
        ValueError: a split has no clients, a client has no examples, ``x``
            and ``y`` differ in length, features are not finite, labels are
            out of range or of two kinds, shapes differ between clients (each
            message names the split and client), the data does not fit the
            ready model, or no default target is defined.

    Example:
        >>> import fathom_tune, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> def client(n):
        ...     return rng.normal(size=(n, 4)), rng.integers(0, 3, n)
        >>> task = fathom_tune.tasks.from_arrays(
        ...     "toy", {"a": client(10), "b": client(30)}, {"c": client(5)}, {"d": client(5)})
        >>> task.train.num_clients(), task.clients_per_round, task.init_hparams.batch_size
        (2, 2, 4.0)
        >>> task.bounds.upper.batch_size, task.target.metric
        (30.0, 'accuracy')
    """
    if model is not None and not isinstance(model, fedjax.Model):
        raise TypeError(
            f"model must be a fedjax.Model, got {type(model).__name__}; pass None for the ready model"
        )
    for arg, value, kind in (
        ("target", target, Target),
        ("init_hparams", init_hparams, HParams),
        ("bounds", bounds, Bounds),
    ):
        if value is not None and not isinstance(value, kind):
            raise TypeError(
                f"{arg} must be a fathom_tune.{kind.__name__} or None, got {type(value).__name__}"
            )
    splits = {
        split: _convert_split(split, data)
        for split, data in zip(_SPLITS, (train, validation, test))
    }
    _check_shapes(splits)
    first_id, first = next(iter(splits["train"].items()))
    classification = _is_integer(first["y"])
    if num_classes is not None:
        num_classes = checks.positive_int("num_classes", num_classes)
        if not classification:
            raise ValueError(
                f"num_classes={num_classes} is for integer labels (classes), but train"
                f"[{first_id!r}] y is floating (regression); leave num_classes=None"
            )
    elif model is not None:
        num_classes = _infer_num_classes(model, first_id, first)
    elif classification:
        num_classes = _label_classes(splits)
    for split, clients in splits.items():
        for cid, examples in clients.items():
            _check_labels(f"{split}[{cid!r}]", examples["y"], num_classes)
    ready = model is None
    if ready:
        model = _ready_model(first_id, first, num_classes if classification else None)
    sizes = [len(examples["y"]) for examples in splits["train"].values()]
    start, default_bounds = _default_hparams(sizes)
    if bounds is None:
        bounds = default_bounds
    if init_hparams is None:
        init_hparams = bounds.clip(start)
    if clients_per_round is None:
        clients_per_round = min(MAX_CLIENTS_PER_ROUND, len(sizes))
    if target is None:
        target = _default_target(splits["validation"], model, classification, ready)
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


def _default_hparams(sizes: list[int]) -> tuple[HParams, Bounds]:
    """The default start and bounds for training clients of ``sizes`` examples."""
    batch = min(
        max(math.floor(float(np.median(sizes)) / STEPS_PER_EPOCH + 0.5), 1), MAX_DEFAULT_BATCH
    )
    start = HParams(DEFAULT_LEARNING_RATE, DEFAULT_LOCAL_EPOCHS, float(batch))
    bounds = Bounds(
        lower=HParams(LEARNING_RATE_BOUNDS[0], LOCAL_EPOCHS_BOUNDS[0], 1.0),
        upper=HParams(LEARNING_RATE_BOUNDS[1], LOCAL_EPOCHS_BOUNDS[1], float(max(sizes))),
    )
    return start, bounds


def _label_classes(splits) -> int:
    """The largest integer label + 1 over all splits (at least 1)."""
    high = max(int(ex["y"].max()) for clients in splits.values() for ex in clients.values())
    return max(high + 1, 1)


def _ready_model(cid: bytes, examples, num_classes: int | None) -> fedjax.Model:
    x_shape, y_shape = examples["x"].shape[1:], examples["y"].shape[1:]
    where = f"train[{cid!r}]"
    if not 1 <= len(x_shape) <= 3:
        raise ValueError(
            f"{where} x has per-example shape {x_shape}; the ready models take x of shape "
            "(n, d) (MLP) or images (n, h, w) / (n, h, w, c) (CNN); pass model= for others"
        )
    if num_classes is not None and y_shape != ():
        raise ValueError(
            f"{where} y has per-example shape {y_shape}; integer labels are class indices, one "
            "per example (y of shape (n,)); for regression pass floating labels"
        )
    if num_classes == 1:
        raise ValueError(
            "num_classes=1 (every label is 0): the ready classifier needs at least 2 classes; "
            "pass num_classes >= 2, or floating labels for regression"
        )
    return ready_model(x_shape, num_classes=num_classes, y_shape=y_shape)


def _default_target(validation, model: fedjax.Model, classification: bool, ready: bool) -> Target:
    """Halves the validation error of the best constant prediction (see from_arrays)."""
    y = np.concatenate([examples["y"] for examples in validation.values()])
    if classification:
        if "accuracy" not in model.eval_metrics:
            raise ValueError(
                "target=None: the default target is an accuracy, but the model's eval_metrics "
                f"are {sorted(model.eval_metrics)}; pass target=fathom_tune.Target(...)"
            )
        majority = np.bincount(y).max() / len(y)
        return Target("accuracy", (1.0 + float(majority)) / 2.0)
    if not ready:
        raise ValueError(
            "target=None: floating labels (regression) have a default target only with the "
            "ready model, whose 'loss' is the mean squared error; pass target=fathom_tune.Target(...)"
        )
    return Target("loss", float(np.var(y.astype(np.float64), axis=0).mean()) / 2.0, mode="min")


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
            if _is_integer(examples["y"]) != _is_integer(ref["y"]):
                kinds = {True: "integer (classes)", False: "floating (regression)"}
                raise ValueError(
                    f"{split}[{cid!r}]: y is {kinds[_is_integer(examples['y'])]}, but "
                    f"{ref_split}[{ref_id!r}] y is {kinds[_is_integer(ref['y'])]}; all clients "
                    "need labels of one kind"
                )


def _is_integer(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer))


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
