"""FATHOM's hypergradients and its exponentiated-gradient step, as pure functions.

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
* the hyperparameters move in log space, ``p = log([E, eta, B])``
  (:func:`egn_step`).

Model-shaped arguments are pytrees (JAX or NumPy arrays); those functions use
``jax.numpy`` only, so they run eagerly, under ``jax.jit`` and under
``jax.vmap``. The 3-vector ``p`` is plain NumPy float64.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fathom_tune._hparams import Bounds, HParams

__all__ = [
    "EGN_ORDER",
    "ClientTracker",
    "FathomConfig",
    "ServerTracker",
    "aggregate_round",
    "client_cosine",
    "egn_step",
    "global_hypergradient",
    "hparams_from_log",
    "local_hypergradient",
    "log_hparams",
    "safe_cosine",
    "update_momentum",
]

PyTree = Any

EGN_ORDER = ("local_epochs", "learning_rate", "batch_size")
"""The order of the entries of ``p = log([E, eta, B])``."""


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
    return float(np.clip(np.dot(weights, phis) / np.sum(weights), -1.0, 1.0))


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
    """The server's moving average ``m`` of global updates, functional.

    :meth:`update` takes the round's mean update ``u`` and returns
    ``(H, new_tracker)`` with ``H = cos(m_prev, u)``. Keep it with the model:
    a resumed run must restore ``m`` too. Skip the update for a round that
    is discarded (e.g. one that diverged).

    Attributes:
        momentum: ``m``, zeros before the first round.

    Example:
        >>> import numpy as np
        >>> server = ServerTracker.init(np.zeros(2))
        >>> H, server = server.update(np.array([1.0, 0.0]), alpha=0.5)
        >>> float(H), server.momentum.tolist()
        (0.0, [0.5, 0.0])
        >>> H, server = server.update(np.array([1.0, 1.0]), alpha=0.5)
        >>> round(float(H), 4)
        0.7071
    """

    momentum: PyTree

    @classmethod
    def init(cls, params: PyTree) -> ServerTracker:
        """``m = 0`` shaped like the model ``params``."""
        return cls(momentum=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(self, update: PyTree, *, alpha: float) -> tuple[jax.Array, ServerTracker]:
        """Returns ``(H, tracker)``: ``H`` from the previous ``m``, then ``m`` updated."""
        h = global_hypergradient(self.momentum, update)
        return h, ServerTracker(momentum=update_momentum(self.momentum, update, alpha))


def log_hparams(hparams: HParams) -> np.ndarray:
    """``p = log([E, eta, B])`` (float64, in :data:`EGN_ORDER`).

    >>> log_hparams(HParams(learning_rate=1.0, local_epochs=1.0, batch_size=1.0)).tolist()
    [0.0, 0.0, 0.0]
    """
    return np.log(np.array([getattr(hparams, n) for n in EGN_ORDER], dtype=np.float64))


def hparams_from_log(p) -> HParams:
    """The :class:`HParams` ``exp(p)`` of ``p = log([E, eta, B])``.

    >>> hparams_from_log([0.0, 0.0, 0.0])
    HParams(learning_rate=1.0, local_epochs=1.0, batch_size=1.0)
    """
    values = np.exp(_vector3("p", p))
    return HParams(**{n: float(v) for n, v in zip(EGN_ORDER, values)})


def _vector3(name: str, value) -> np.ndarray:
    out = np.asarray(value, dtype=np.float64)
    if out.shape != (3,):
        raise ValueError(f"{name} must have shape (3,) in the order {EGN_ORDER}, got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def egn_step(p, H: float, G: float, gamma, lower, upper) -> np.ndarray:
    """One FATHOM hyper step on ``p = log([E, eta, B])``, clipped to the bounds.

    ``log E += gamma_E (H + G)``, ``log eta += gamma_eta H``,
    ``log B -= gamma_B G``; then ``p`` itself is clipped into
    ``[log lower, log upper]``, so it never winds up past a bound: one step in
    the other direction moves away from the bound at once.

    Args:
        p: ``log([E, eta, B])``, shape (3,), :data:`EGN_ORDER`.
        H: the global hypergradient of the round.
        G: the local hypergradient of the round.
        gamma: ``(gamma_E, gamma_eta, gamma_B)``, each >= 0.
        lower: ``(E, eta, B)`` lower bounds (> 0, natural units).
        upper: ``(E, eta, B)`` upper bounds (natural units).

    Returns:
        The next ``p``, float64 array of shape (3,).

    Example:
        >>> p = np.log([1.0, 0.1, 20.0])
        >>> q = egn_step(p, H=0.5, G=0.8, gamma=(0.01, 0.01, 0.1), lower=(0.1, 1e-3, 1.0),
        ...              upper=(10.0, 1.0, 256.0))
        >>> np.round(q - p, 6).tolist()  # [0.01*(0.5+0.8), 0.01*0.5, -0.1*0.8]
        [0.013, 0.005, -0.08]
    """
    p = _vector3("p", p)
    gamma = _vector3("gamma", gamma)
    lower, upper = _vector3("lower", lower), _vector3("upper", upper)
    if np.any(lower <= 0) or np.any(lower > upper):
        raise ValueError(
            f"need 0 < lower <= upper, got lower={lower.tolist()}, upper={upper.tolist()}"
        )
    H, G = _finite("H", H), _finite("G", G)
    step = gamma * np.array([H + G, H, -G])
    return np.clip(p + step, np.log(lower), np.log(upper))


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"FathomConfig.{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"FathomConfig.{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class FathomConfig:
    """FATHOM's settings; the defaults are the paper's.

    Attributes:
        init: the first round's hyperparameters; ``None`` takes the task's
            defaults.
        bounds: the box the hyperparameters stay in (``p`` is clipped to it);
            ``None`` takes the task's bounds.
        gamma_local_epochs: ``gamma_E``, hyper learning rate of ``log E``
            (default 0.01).
        gamma_learning_rate: ``gamma_eta``, hyper learning rate of ``log eta``
            (default 0.01).
        gamma_batch_size: ``gamma_B``, hyper learning rate of ``log B``
            (default 0.1).
        alpha: smoothing of the moving average ``m`` of global updates, in
            ``[0, 1)`` (default 0.5).

    A hyper learning rate of 0 freezes that hyperparameter.

    Example:
        >>> FathomConfig(gamma_batch_size=0.05).gamma
        (0.01, 0.01, 0.05)
    """

    init: HParams | None = None
    bounds: Bounds | None = None
    gamma_local_epochs: float = 0.01
    gamma_learning_rate: float = 0.01
    gamma_batch_size: float = 0.1
    alpha: float = 0.5

    def __post_init__(self):
        if self.init is not None and not isinstance(self.init, HParams):
            raise TypeError(f"FathomConfig.init must be an HParams or None, got {self.init!r}")
        if self.bounds is not None and not isinstance(self.bounds, Bounds):
            raise TypeError(f"FathomConfig.bounds must be a Bounds or None, got {self.bounds!r}")
        for name in ("gamma_local_epochs", "gamma_learning_rate", "gamma_batch_size", "alpha"):
            object.__setattr__(self, name, _check_rate(name, getattr(self, name)))
        if not self.alpha < 1.0:
            raise ValueError(f"FathomConfig.alpha must be in [0, 1), got {self.alpha!r}")
        if self.init is not None and self.bounds is not None:
            self.bounds.check(self.init, what="FathomConfig.init")

    @property
    def gamma(self) -> tuple[float, float, float]:
        """``(gamma_E, gamma_eta, gamma_B)`` in :data:`EGN_ORDER`."""
        return (self.gamma_local_epochs, self.gamma_learning_rate, self.gamma_batch_size)
