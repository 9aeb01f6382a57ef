"""FATHOM's hypergradients, as pure functions, and its client and server trackers.

Implements the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106), with the conventions of the project's FATHOM_SPEC (the
author's code where it differs from the paper; ``p`` clipped to its bounds).

One round ``t``:

* client ``i`` starts at ``x0``, runs ``x_{k+1} = x_k - eta * g_k`` and keeps
  ``phi_i = min_k cos(g_k, d_k)`` with ``d_k = x0 - x_{k+1}``
  (:class:`ClientTracker`, :func:`client_cosine`);
* the server forms ``u = sum_i w_i (x0 - x_{K_i})`` and the *local*
  hypergradient ``G = sum_i w_i phi_i``, ``w_i = n_i / sum n``
  (:func:`aggregate_round`, :func:`local_hypergradient`);
* the *global* hypergradient is ``H = cos(m, u)`` with the previous moving
  average ``m``, then ``m <- alpha m + (1 - alpha) u``
  (:class:`ServerTracker`, :func:`global_hypergradient`,
  :func:`update_momentum`);
* the hyperparameters move in log space (:mod:`fathom_tune.fathom.state`).

Model-shaped arguments are pytrees (JAX or NumPy arrays); those functions use
``jax.numpy`` only, so they run eagerly, under ``jax.jit`` and under
``jax.vmap``. The 3-vector ``p`` is plain NumPy float64.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fathom_tune import checks

__all__ = [
    "ClientTracker",
    "LocalAgreement",
    "ServerTracker",
    "TrackedState",
    "aggregate_round",
    "client_cosine",
    "global_hypergradient",
    "local_hypergradient",
    "safe_cosine",
    "track_agreement",
    "update_momentum",
]

PyTree = Any


def _accumulator_dtype(leaves) -> jnp.dtype:
    # At least float32 (bfloat16/float16 leaves accumulate in float32), float64
    # only where JAX's x64 mode allows it.
    wide = any(np.dtype(jnp.result_type(x)).itemsize > 4 for x in leaves)
    return jax.dtypes.canonicalize_dtype(jnp.float64 if wide else jnp.float32)


def safe_cosine(a: PyTree, b: PyTree) -> jax.Array:
    """Cosine similarity ``<a, b> / (|a| |b|)`` of two pytrees, never NaN.

    The pytrees are treated as one flat vector each. The result is clamped to
    ``[-1, 1]``; it is ``0`` when either norm is 0, and also when an inner
    product is not finite (overflowing or non-finite inputs: the cosine is
    undefined there, and divergence is for the loss to detect). Its gradient is
    finite everywhere (no ``sqrt(0)`` is differentiated). Uses ``jax.numpy``
    only, so it works under ``jax.jit`` and ``jax.vmap``.

    Args:
        a: a pytree of arrays.
        b: a pytree of the same structure and leaf shapes as ``a``.

    Returns:
        A scalar array, float32 (float64 for float64 leaves with x64 enabled).

    Raises:
        ValueError: if the structures or leaf shapes differ.

    Example:
        >>> import jax.numpy as jnp
        >>> a = {"w": jnp.array([1.0, 0.0]), "b": jnp.array(0.0)}
        >>> b = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}
        >>> round(float(safe_cosine(a, b)), 4), float(safe_cosine(a, {"w": jnp.zeros(2), "b": 0.0}))
        (0.7071, 0.0)
    """
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    if tree_a != tree_b:
        raise ValueError(f"safe_cosine: the two pytrees differ in structure: {tree_a} vs {tree_b}")
    for x, y in zip(leaves_a, leaves_b):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"safe_cosine: leaf shapes differ: {jnp.shape(x)} vs {jnp.shape(y)}; "
                "both pytrees must have the same leaf shapes"
            )
    acc = _accumulator_dtype(leaves_a + leaves_b)
    zero = jnp.zeros((), acc)

    def total(pairs):
        return sum(
            (jnp.sum(jnp.asarray(x, acc) * jnp.asarray(y, acc)) for x, y in pairs), start=zero
        )

    dot = total(zip(leaves_a, leaves_b))
    aa = total(zip(leaves_a, leaves_a))
    bb = total(zip(leaves_b, leaves_b))
    ok = (aa > 0) & (bb > 0) & jnp.isfinite(aa) & jnp.isfinite(bb) & jnp.isfinite(dot)
    denom = jnp.sqrt(jnp.where(ok, aa, 1.0)) * jnp.sqrt(jnp.where(ok, bb, 1.0))
    return jnp.where(ok, jnp.clip(jnp.where(ok, dot, 0.0) / denom, -1.0, 1.0), 0.0)


def client_cosine(grad: PyTree, update: PyTree) -> jax.Array:
    """``c_k = cos(g_k, d_k)``: one local step's contribution to ``phi_i``.

    ``grad`` is the step's minibatch gradient ``g_k`` at ``x_k``; ``update`` is
    the accumulated local update *after* the step, ``d_k = x0 - x_{k+1}``.
    A client keeps ``phi_i = min_k c_k``, starting from ``phi = +1``: the first
    step has ``d_0 = eta g_0`` so ``c_0 = 1``, hence ``phi_i <= 1`` and
    ``phi_i = 1`` for a client with one local step. A zero gradient or a zero
    update gives ``c_k = 0`` (see :func:`safe_cosine`). :class:`ClientTracker`
    packages this running minimum.

    Example:
        >>> import jax.numpy as jnp
        >>> g0 = jnp.array([1.0, 0.0])
        >>> float(client_cosine(g0, 0.1 * g0))
        1.0
    """
    return safe_cosine(grad, update)


def local_hypergradient(phis, num_examples) -> float:
    """``G = sum_i w_i phi_i`` with ``w_i = n_i / sum_j n_j``, clamped to ``[-1, 1]``.

    A host-side computation over one scalar per client (NumPy, float64).

    Args:
        phis: each sampled client's ``phi_i`` (1-D array-like).
        num_examples: each client's example count ``n_i`` (> 0), same length.

    Example:
        >>> round(local_hypergradient([1.0, 0.5], [30, 10]), 6)  # 0.75*1 + 0.25*0.5
        0.875
    """
    phis = np.asarray(phis, np.float64)
    weights = np.asarray(num_examples, np.float64)
    if phis.shape != weights.shape or phis.ndim != 1:
        raise ValueError(
            f"local_hypergradient: phis {phis.shape} and num_examples {weights.shape} "
            "must be 1-D and of the same length"
        )
    return min(max(float(np.dot(weights, phis) / np.sum(weights)), -1.0), 1.0)


def global_hypergradient(momentum: PyTree, update: PyTree) -> jax.Array:
    """``H = cos(m, u)`` with the moving average ``m`` *before* this round's update.

    ``H = 0`` when either norm is 0, so ``H = 0`` in round 1 (``m = 0``).

    Example:
        >>> import jax.numpy as jnp
        >>> float(global_hypergradient(jnp.zeros(2), jnp.ones(2)))
        0.0
    """
    return safe_cosine(momentum, update)


def update_momentum(momentum: PyTree, update: PyTree, alpha: float) -> PyTree:
    """``m <- alpha * m + (1 - alpha) * u`` (no bias correction).

    Example:
        >>> import jax.numpy as jnp
        >>> update_momentum(jnp.zeros(2), jnp.array([2.0, 4.0]), 0.5).tolist()
        [1.0, 2.0]
    """
    return jax.tree_util.tree_map(lambda m, u: alpha * m + (1.0 - alpha) * u, momentum, update)


def aggregate_round(deltas: Sequence[PyTree], phis, num_examples) -> tuple[PyTree, jax.Array]:
    """The server side of a round: ``u = sum_i w_i Delta_i`` and ``G``.

    Args:
        deltas: each client's update ``Delta_i = x0 - x_{K_i}`` (pytrees of the
            same structure).
        phis: each client's ``phi_i``.
        num_examples: each client's example count ``n_i`` (> 0).

    Returns:
        ``(u, G)``: the example-weighted mean update (gradient-signed, the
        server applies ``x <- x - u`` for FedAvg) and the local hypergradient
        (:func:`local_hypergradient`).

    Example:
        >>> import numpy as np
        >>> u, G = aggregate_round([np.array([1.0]), np.array([3.0])], [1.0, 0.5], [1, 3])
        >>> u.tolist(), float(G)
        ([2.5], 0.625)
    """
    if len(deltas) == 0 or len(deltas) != len(num_examples):
        raise ValueError(
            f"aggregate_round: got {len(deltas)} deltas and {len(num_examples)} example counts; "
            "need one of each per client, at least one client"
        )
    G = local_hypergradient(phis, num_examples)
    dtype = _accumulator_dtype(jax.tree_util.tree_leaves(deltas[0]))
    weights = jnp.asarray(num_examples).astype(dtype)
    weights = weights / jnp.sum(weights)
    u = jax.tree_util.tree_map(
        lambda *leaves: sum(
            w * jnp.asarray(x, dtype) for w, x in zip(weights, leaves, strict=True)
        ),
        *deltas,
    )
    return u, G


class ClientTracker(NamedTuple):
    """A client's running ``phi = min_k cos(g_k, x0 - x_{k+1})``, functional.

    A pytree (works as a ``lax.scan``/``fori_loop`` carry); :meth:`update`
    returns a new tracker.

    Attributes:
        x0: the server model the client started from.
        phi: the running minimum, ``+1`` before the first step.

    Example:
        >>> import numpy as np
        >>> x = np.array([1.0, 1.0]); tracker = ClientTracker.init(x)
        >>> for g in (np.array([1.0, 0.0]), np.array([0.0, 1.0])):
        ...     x = x - 0.5 * g
        ...     tracker = tracker.update(g, x)
        >>> round(float(tracker.phi), 4)  # cos([0,1], [0.5,0.5]) = 1/sqrt(2)
        0.7071
    """

    x0: PyTree
    phi: jax.Array

    @classmethod
    def init(cls, x0: PyTree) -> ClientTracker:
        """A tracker at the start of local training from ``x0``."""
        dtype = _accumulator_dtype(jax.tree_util.tree_leaves(x0))
        return cls(x0=x0, phi=jnp.ones((), dtype))

    def update(self, grad: PyTree, params: PyTree) -> ClientTracker:
        """After the step ``params = x_{k+1} = x_k - eta * grad``."""
        delta = jax.tree_util.tree_map(lambda a, b: a - b, self.x0, params)
        c = client_cosine(grad, delta).astype(self.phi.dtype)
        return self._replace(phi=jnp.minimum(self.phi, c))


class ServerTracker(NamedTuple):
    """FATHOM's server state: the moving average ``m`` of global updates and its smoothing.

    :meth:`update` takes the round's mean update ``u`` and returns
    ``(H, new_tracker)`` with ``H = cos(m_prev, u)`` and
    ``m <- alpha m + (1 - alpha) u``. Keep it with the model: a resumed run
    must restore ``m`` too. Skip the update for a round that is discarded
    (e.g. one that diverged). A pytree (``alpha`` is a leaf), so it passes
    through ``jax.jit``.

    Attributes:
        momentum: ``m``, zeros before the first round.
        alpha: the smoothing of ``m``, in ``[0, 1)`` (FATHOM's default 0.5).

    Example:
        >>> import numpy as np
        >>> server = ServerTracker.init(np.zeros(2), alpha=0.5)
        >>> H, server = server.update(np.array([1.0, 0.0]))
        >>> float(H), server.momentum.tolist()
        (0.0, [0.5, 0.0])
        >>> H, server = server.update(np.array([1.0, 1.0]))
        >>> round(float(H), 4)
        0.7071
    """

    momentum: PyTree
    alpha: float = 0.5

    @classmethod
    def init(cls, params: PyTree, *, alpha: float = 0.5) -> ServerTracker:
        """``m = 0`` shaped like the model ``params``."""
        return cls(momentum=jax.tree_util.tree_map(jnp.zeros_like, params), alpha=_checked_alpha(alpha))

    def update(self, update: PyTree) -> tuple[jax.Array, ServerTracker]:
        """Returns ``(H, tracker)``: ``H`` from the previous ``m``, then ``m`` updated.

        ``H`` is computed on the two pytrees as flat vectors: a few operations
        instead of a few per parameter array (on XLA:CPU each costs microseconds
        whatever its size).
        """
        h = global_hypergradient(ravel_pytree(self.momentum)[0], ravel_pytree(update)[0])
        return h, self._replace(momentum=update_momentum(self.momentum, update, self.alpha))


def _checked_alpha(alpha) -> float:
    alpha = checks.nonnegative_real("alpha", alpha)
    if not alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    return alpha


class TrackedState(NamedTuple):
    """The state of :func:`track_agreement`: the inner optimizer's, and FATHOM's server side.

    Attributes:
        inner: the wrapped server optimizer's state.
        momentum: ``m`` after the last update (zeros before the first).
        h: ``H = cos(m_prev, u)`` of the last update (0 before the first).
    """

    inner: Any
    momentum: PyTree
    h: jax.Array


@functools.lru_cache(maxsize=32)
def track_agreement(inner: optax.GradientTransformation, alpha: float) -> optax.GradientTransformation:
    """``inner`` as the server optimizer, with :class:`ServerTracker`'s step in the same update.

    Each update ``u`` (the round's mean FedAvg update) also computes
    ``H = cos(m, u)`` and ``m <- alpha m + (1 - alpha) u`` into the state
    (:class:`TrackedState`); the steps are ``inner``'s unchanged. An engine
    with this server optimizer computes FATHOM's ``H`` inside the round's
    compiled call: no call of its own per round, and a diverged round, whose
    state the loop discards, leaves ``m`` as it was. The same ``(inner,
    alpha)`` gives the same object, so engines share compiled programs.

    >>> import jax.numpy as jnp
    >>> rule = track_agreement(optax.sgd(1.0), 0.5)
    >>> state = rule.init({"w": jnp.zeros(2)})
    >>> step, state = rule.update({"w": jnp.array([1.0, 0.0])}, state)
    >>> step["w"].tolist(), float(state.h), state.momentum["w"].tolist()
    ([-1.0, -0.0], 0.0, [0.5, 0.0])
    >>> step, state = rule.update({"w": jnp.array([1.0, 1.0])}, state)
    >>> round(float(state.h), 4)
    0.7071
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    alpha = _checked_alpha(alpha)

    def init(params):
        tracker = ServerTracker.init(params, alpha=alpha)
        dtype = _accumulator_dtype(jax.tree_util.tree_leaves(params))
        return TrackedState(inner=inner.init(params), momentum=tracker.momentum, h=jnp.zeros((), dtype))

    def update(updates, state, params=None):
        # alpha as a traced scalar, as a jitted ServerTracker.update sees it: the same
        # numbers as the ask-and-tell protocol's tracker, bit for bit.
        h, tracker = ServerTracker(momentum=state.momentum, alpha=jnp.asarray(alpha)).update(updates)
        step, inner_state = inner.update(updates, state.inner, params)
        return step, TrackedState(inner=inner_state, momentum=tracker.momentum, h=h.astype(state.h.dtype))

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class LocalAgreement:
    """FATHOM's client statistic ``phi_i = min_k cos(g_k, x0 - x_{k+1})`` as an engine hook.

    A :class:`fathom_tune.engine.ClientStatistic`: FATHOM turns it on with
    ``Engine(task, client_statistic=LocalAgreement())``; each step folds
    :meth:`ClientTracker.update` into the client's running minimum (start +1).
    """

    name: str = "phi"
    initial: float = 1.0

    def update(self, stat, x0, grad, params):
        return ClientTracker(x0=x0, phi=stat).update(grad, params).phi
