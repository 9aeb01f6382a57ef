"""Ready FedJAX models for your own arrays: an MLP for feature vectors, a small CNN for images.

:func:`ready_model` picks the architecture from the shape of one example's
``x`` and the head from the labels: ``num_classes`` logits trained with
cross-entropy for class indices, or a linear output of ``y``'s shape trained
with the squared error for regression. These are the models that
:func:`fathom_tune.tasks.from_arrays` and :func:`fathom_tune.tasks.from_clients`
use when you pass no ``model``; they are what the FATHOM paper ("Federated
Hypergradient Descent", A. K. Kan, arXiv 2211.02106) tunes FedAvg on:
small networks trained with plain client SGD.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import fedjax
import haiku as hk
import jax
import jax.numpy as jnp

from fathom_tune import checks
from fathom_tune.tasks import _common

__all__ = ["MeanSquaredError", "ready_model"]

MLP_HIDDEN = (64, 64)
"""Hidden widths of the ready MLP (ReLU after each)."""
CNN_CHANNELS = (16, 32)
"""Channels of the ready CNN's two 3x3 convolutions (ReLU, then 2x2 max pooling each)."""
CNN_HIDDEN = 64
"""Width of the ready CNN's dense layer after the convolutions."""


@dataclasses.dataclass(frozen=True)
class MeanSquaredError(fedjax.metrics.Metric):
    """Mean over examples of the squared error, averaged over each label's entries.

    For one example, ``mean((prediction - y) ** 2)``; for scalar labels just
    ``(prediction - y) ** 2``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(MeanSquaredError().evaluate_example({"y": jnp.array([1.0, 2.0])},
        ...                                           jnp.array([2.0, 4.0])).result())
        2.5
    """

    target_key: str = "y"

    def zero(self) -> fedjax.metrics.MeanStat:
        return fedjax.metrics.MeanStat.new(0.0, 0.0)

    def evaluate_example(self, example, prediction) -> fedjax.metrics.MeanStat:
        return fedjax.metrics.MeanStat.new(
            _squared_error(example[self.target_key], prediction), 1.0
        )


def ready_model(x_shape, *, num_classes: int | None = None, y_shape=()) -> fedjax.Model:
    """A ready ``fedjax.Model`` for examples ``x`` of shape ``x_shape``.

    The body is chosen by ``x_shape``, the shape of *one* example:

    * ``(d,)`` feature vectors: an MLP ``d -> 64 -> 64 -> out`` (ReLU).
    * ``(h, w)`` or ``(h, w, c)`` images (``(h, w)`` gets one channel): a small
      CNN, two blocks of a 3x3 convolution (16, then 32 channels, ReLU) and
      2x2 max pooling (``SAME`` padding, so images as small as 1x1 work),
      then a dense layer of 64 (ReLU) and the output.

    The head is chosen by ``num_classes``:

    * an int: classification, ``num_classes`` logits, per-example
      cross-entropy as the training loss, eval metrics ``loss``
      (cross-entropy) and ``accuracy``; labels are class indices, ``y`` of
      shape ``(n,)``.
    * ``None``: regression, a linear output of shape ``y_shape`` (one
      example's label; ``()`` for one number), per-example squared error
      (averaged over the label's entries) as the training loss, eval metric
      ``loss`` (:class:`MeanSquaredError`).

    Inputs are cast to float32, so integer features are used as numbers.
    Like any plain SGD model, it trains best on features (and regression
    labels) of about unit scale. The model has no dropout or other
    randomness: the same initialisation key gives the same parameters and
    the same predictions. Equal arguments return the same model object, so
    tasks built over arrays of the same shapes share compiled programs.

    Args:
        x_shape: the shape of one example's features, ``x.shape[1:]``.
        num_classes: number of classes (>= 1) for classification; ``None``
            for regression.
        y_shape: the shape of one example's regression label, ``y.shape[1:]``;
            must be ``()`` for classification.

    Returns:
        The model, taking batches ``{'x': float32 [n, *x_shape], 'y': ...}``.

    Raises:
        TypeError: a shape is not a tuple of ints, or ``num_classes`` is not an int.
        ValueError: ``x_shape`` has another rank, a dimension < 1, ``num_classes``
            < 1, or ``y_shape`` is not ``()`` for classification.

    Example:
        >>> import jax, numpy as np
        >>> model = ready_model((8,), num_classes=3)
        >>> params = model.init(jax.random.PRNGKey(0))
        >>> model.apply_for_eval(params, {"x": np.zeros((5, 8), np.float32)}).shape
        (5, 3)
        >>> sorted(model.eval_metrics), sorted(ready_model((28, 28), y_shape=(2,)).eval_metrics)
        (['accuracy', 'loss'], ['loss'])
    """
    x_shape = _shape("x_shape", x_shape)
    y_shape = _shape("y_shape", y_shape)
    if not 1 <= len(x_shape) <= 3:
        raise ValueError(
            f"x_shape={x_shape} has rank {len(x_shape)}; the ready models take (d,) feature "
            "vectors (MLP) or (h, w) / (h, w, c) images (CNN); pass your own model for others"
        )
    if num_classes is not None:
        num_classes = checks.positive_int("num_classes", num_classes)
        if y_shape != ():
            raise ValueError(
                f"y_shape={y_shape} with num_classes={num_classes}: a classifier takes one class "
                "index per example, y_shape=(); use num_classes=None for regression"
            )
    return _build(x_shape, num_classes, y_shape)


def _shape(name: str, value) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value
    ):
        raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
    if any(d < 1 for d in value):
        raise ValueError(f"{name}={value} has a dimension < 1; every dimension must be >= 1")
    return tuple(int(d) for d in value)


def _squared_error(y, prediction):
    """One example's squared error, averaged over the label's entries."""
    return jnp.mean(jnp.square(prediction - y))


def _regression_loss(batch, preds):
    return jax.vmap(_squared_error)(batch["y"], preds)


@functools.lru_cache(maxsize=32)
def _build(
    x_shape: tuple[int, ...], num_classes: int | None, y_shape: tuple[int, ...]
) -> fedjax.Model:
    num_out = num_classes if num_classes is not None else math.prod(y_shape)

    def forward(batch):
        x = batch["x"].astype(jnp.float32)
        if len(x_shape) == 1:
            layers = [hk.Flatten()]
            for width in MLP_HIDDEN:
                layers += [hk.Linear(width), jax.nn.relu]
        else:
            if len(x_shape) == 2:
                x = x[..., None]
            layers = []
            for channels in CNN_CHANNELS:
                layers += [
                    hk.Conv2D(channels, kernel_shape=3),
                    jax.nn.relu,
                    hk.MaxPool(window_shape=(2, 2, 1), strides=(2, 2, 1), padding="SAME"),
                ]
            layers += [hk.Flatten(), hk.Linear(CNN_HIDDEN), jax.nn.relu]
        out = hk.Sequential([*layers, hk.Linear(num_out)])(x)
        if num_classes is None:
            out = out.reshape(out.shape[:1] + y_shape)
        return out

    if num_classes is None:
        y_sample = jnp.zeros((1, *y_shape), jnp.float32)
        train_loss, eval_metrics = _regression_loss, {"loss": MeanSquaredError()}
    else:
        y_sample = jnp.zeros((1,), jnp.int32)
        train_loss, eval_metrics = _common.classification_loss, _common.classification_metrics()
    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward),
        sample_batch={"x": jnp.zeros((1, *x_shape), jnp.float32), "y": y_sample},
        train_loss=train_loss,
        eval_metrics=eval_metrics,
    )
