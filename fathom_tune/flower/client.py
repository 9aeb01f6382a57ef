"""The client side of FATHOM in any Flower ClientApp: local SGD that reports ``phi``.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
asks each sampled client ``i`` (``n_i`` examples) for exactly what FedAvg
does plus one scalar. With the round's ``(eta, E, B)``:

* ``B_int = max(round_half_up(B), 1)`` and ``K_i = max(ceil(E n_i / B_int), 1)``;
* the client's examples are shuffled and repeated as needed so that each of
  the ``K_i`` steps uses exactly ``B_int`` of them (:func:`batch_plan`);
* ``x_{k+1} = x_k - eta g_k`` from the model ``x0`` it received, and
  ``phi_i = min_k cos(g_k, x0 - x_{k+1})``
  (:class:`fathom_tune.fathom.ClientTracker`);
* it returns ``x_{K_i}``, ``n_i``, ``phi_i``, its mean training loss and
  ``K_i`` (:func:`train_reply`; keys in :mod:`fathom_tune.flower.protocol`).

:class:`LocalSGD` does all of that around a gradient function of your
framework: a JAX ``value_and_grad`` (compiled together with the step when
``jit=True``), or any callable returning a loss and NumPy gradients
(PyTorch, NumPy). :func:`client_generator` and :func:`client_key` give the
random streams of :class:`fathom_tune.Engine`, so a Flower client shuffles
exactly as :func:`fathom_tune.optimize` does.

Example (a JAX ClientApp; ``model`` is a ``fedjax.Model``, ``examples`` the
client's ``{"x": ..., "y": ...}``):

.. code-block:: python

    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from fathom_tune import flower as ff

    local_sgd = ff.LocalSGD(ff.fedjax_grad_fn(model), jit=True)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        hparams, round_index = ff.read_train_config(msg.content["config"])
        params = ff.from_array_record(msg.content["arrays"], like=template)
        result = local_sgd(params, examples, hparams,
                           rng=ff.client_generator(seed, round_index, client_index),
                           key=ff.client_key(seed, round_index, client_index))
        return Message(content=ff.train_reply(result), reply_to=msg)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import MetricRecord, RecordDict

from fathom_tune import checks
from fathom_tune.engine import batching, client_rng
from fathom_tune.engine.xla_options import compiler_options
from fathom_tune.fathom import ClientTracker
from fathom_tune.flower import protocol
from fathom_tune.hparams import HParams

__all__ = [
    "LocalResult",
    "LocalSGD",
    "batch_plan",
    "client_generator",
    "client_key",
    "fedjax_grad_fn",
    "train_reply",
]

PyTree = Any
GradFn = Callable[[PyTree, Mapping[str, Any], jax.Array], tuple[Any, PyTree]]

def client_generator(seed: int, round_index: int, client_index: int) -> np.random.Generator:
    """The generator that orders client ``client_index``'s data in round ``round_index``:
    :func:`fathom_tune.engine.client_rng`, so a Flower client and the engine draw the
    same batches; ``client_index`` is the client's position in ``train.client_ids()``.

    Example:
        >>> a = client_generator(0, 3, 1).permutation(5)
        >>> b = client_generator(0, 3, 1).permutation(5)
        >>> a.tolist() == b.tolist()
        True
    """
    values = [
        checks.seed(n, v)
        for n, v in (("seed", seed), ("round_index", round_index), ("client_index", client_index))
    ]
    return client_rng(*values)


def client_key(seed: int, round_index: int, client_index: int) -> jax.Array:
    """The model's random key of a client's round, as :class:`fathom_tune.Engine` folds it.

    :class:`LocalSGD` folds the local step ``k`` into it for step ``k``
    (dropout and other randomness inside the model).
    """
    key = jax.random.fold_in(jax.random.PRNGKey(checks.seed("seed", seed)), round_index)
    return jax.random.fold_in(key, client_index)


def batch_plan(num_examples: int, hparams: HParams, rng: np.random.Generator) -> np.ndarray:
    """Example indices ``[K_i, B_int]`` of one client's round: shuffle, repeat.

    The ``K_i * B_int`` indices come from consecutive passes over the
    client's examples, each pass a fresh permutation from ``rng``; so every
    step has exactly ``B_int`` examples and no example repeats before all
    have been used.

    Example:
        >>> import numpy as np
        >>> hp = HParams(learning_rate=0.1, local_epochs=1.0, batch_size=4.0)
        >>> plan = batch_plan(10, hp, np.random.default_rng(0))
        >>> plan.shape, sorted(plan.ravel()[:10].tolist()) == list(range(10))
        ((3, 4), True)
    """
    n = checks.positive_int("num_examples", num_examples)
    if not isinstance(hparams, HParams):
        raise TypeError(f"hparams must be an HParams, got {hparams!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return batching.batch_plan(batching.Shuffles(rng, n), hparams.local_steps(n), hparams.batch_int)


def fedjax_grad_fn(model) -> GradFn:
    """``(params, batch, key) -> (loss, grads)`` of a ``fedjax.Model``'s mean training loss.

    The loss is the mean of ``model.train_loss`` over the batch, the model
    run with ``apply_for_train`` (``key`` drives dropout and the like).
    """

    def loss(params, batch, key):
        return jnp.mean(model.train_loss(batch, model.apply_for_train(params, batch, key)))

    return jax.value_and_grad(loss)


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """One client's round.

    Attributes:
        params: the trained model ``x_{K_i}`` (same structure as the input).
        phi: ``phi_i = min_k cos(g_k, x0 - x_{k+1})``, ``1.0`` for one step.
        num_examples: ``n_i``, the client's examples.
        local_steps: ``K_i``.
        batch_size: ``B_int``, examples per step.
        train_loss: the mean minibatch loss over the ``K_i`` steps (each at
            the model before its step).
    """

    params: PyTree
    phi: float
    num_examples: int
    local_steps: int
    batch_size: int
    train_loss: float

    def metrics(self) -> dict[str, int | float]:
        """The reply's ``MetricRecord`` entries (``protocol.REPLY_METRICS``)."""
        return {
            protocol.NUM_EXAMPLES: int(self.num_examples),
            protocol.PHI: float(self.phi),
            protocol.TRAIN_LOSS: float(self.train_loss),
            protocol.LOCAL_STEPS: int(self.local_steps),
        }


def train_reply(result: LocalResult) -> RecordDict:
    """The content of a FATHOM client's reply: the trained model and the metrics.

    Use as ``Message(content=train_reply(result), reply_to=msg)``.
    """
    if not isinstance(result, LocalResult):
        raise TypeError(f"result must be a LocalResult, got {type(result).__name__}")
    return RecordDict(
        {
            protocol.ARRAYS: protocol.to_array_record(result.params),
            protocol.METRICS: MetricRecord(result.metrics()),
        }
    )


def _step(grad_fn, x0, params, phi, batch, key, eta):
    loss, grads = grad_fn(params, batch, key)
    new = jax.tree_util.tree_map(
        lambda p, g: p - eta * jnp.asarray(g, jnp.result_type(p)), params, grads
    )
    phi = ClientTracker(x0=x0, phi=phi).update(grads, new).phi
    return new, phi, loss


class LocalSGD:
    """FATHOM's local training around a gradient function, for any Flower ClientApp.

    Args:
        grad_fn: ``(params, batch, key) -> (loss, grads)``: the mean loss over
            ``batch`` (a dict of arrays, ``B_int`` examples) at ``params`` and
            its gradient, a pytree like ``params``; ``key`` is the step's JAX
            random key (ignore it outside JAX). For a ``fedjax.Model`` use
            :func:`fedjax_grad_fn`; for PyTorch, copy ``params`` (NumPy
            arrays) into the module, run ``loss.backward()`` and return the
            gradients as NumPy arrays.
        jit: compile ``grad_fn``, the SGD step and the ``phi`` update
            together with ``jax.jit`` (``grad_fn`` must then be JAX code).
            One program per batch size ``B_int``; the learning rate is an
            argument, so changing it compiles nothing.

    Calling it runs one round (see :meth:`__call__`). Build it once per
    process (at module level of the ClientApp) so compiled steps are reused.
    """

    def __init__(self, grad_fn: GradFn, *, jit: bool = False):
        if not callable(grad_fn):
            raise TypeError(f"grad_fn must be callable, got {grad_fn!r}")
        self.grad_fn = grad_fn
        self.jit = checks.boolean("jit", jit)
        step = functools.partial(_step, grad_fn)
        if self.jit:  # with the engine's options (convolutions without YNNPACK on XLA:CPU)
            step = jax.jit(step, compiler_options=compiler_options(jax.local_devices()))
        self._step = step

    def __call__(
        self,
        params: PyTree,
        examples: Mapping[str, np.ndarray],
        hparams: HParams,
        *,
        rng: np.random.Generator,
        key: jax.Array | None = None,
    ) -> LocalResult:
        """Runs ``K_i`` local SGD steps of ``B_int`` examples from ``params``.

        Args:
            params: the server model ``x0`` (a pytree of arrays).
            examples: the client's data, ``{name: array}`` with a common
                first dimension ``n_i``.
            hparams: the round's ``(eta, E, B)``
                (:func:`~fathom_tune.flower.protocol.read_train_config`).
            rng: orders the data (:func:`batch_plan`); e.g.
                :func:`client_generator`.
            key: the round's JAX key (step ``k`` gets ``fold_in(key, k)``);
                default: one drawn from ``rng`` after the batch plan.

        Returns:
            A :class:`LocalResult`.

        Raises:
            ValueError: ``examples`` is empty or its arrays differ in length.
        """
        if not isinstance(examples, Mapping) or not examples:
            raise ValueError(f"examples must be a non-empty mapping of arrays, got {examples!r}")
        sizes = {name: len(v) for name, v in examples.items()}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(
                f"examples must hold arrays of one non-zero length, got lengths {sizes}"
            )
        n = next(iter(sizes.values()))
        plan = batch_plan(n, hparams, rng)
        if key is None:
            key = jax.random.PRNGKey(int(rng.integers(2**31 - 1)))
        eta = np.float32(hparams.learning_rate)
        x0 = params
        phi = ClientTracker.init(x0).phi
        losses = []
        for k, rows in enumerate(plan):
            batch = {name: np.asarray(v)[rows] for name, v in examples.items()}
            params, phi, loss = self._step(x0, params, phi, batch, jax.random.fold_in(key, k), eta)
            if not self.jit:  # NumPy in, NumPy out: grad_fn keeps seeing NumPy arrays
                params = jax.tree_util.tree_map(np.asarray, params)
            losses.append(loss)
        params = jax.tree_util.tree_map(np.asarray, params)
        return LocalResult(
            params=params,
            phi=float(phi),
            num_examples=n,
            local_steps=len(plan),
            batch_size=hparams.batch_int,
            train_loss=float(np.mean([float(v) for v in losses])),
        )
