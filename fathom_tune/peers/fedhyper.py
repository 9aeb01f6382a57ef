"""FedHyper's learning-rate rules: hypergradients from inner products of successive updates.

"FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent" (Z. Wang, J. Wang, A. Li, ICLR 2024,
arXiv 2310.03156); reference code: the authors' FedHyper repository
(``src/federated_main.py``, ``src/update.py``). Notation: ``x_t`` the server
model, ``Delta_t = (weighted mean of client models) - x_t`` (the FedAvg
update as a descent direction, i.e. minus the engine's gradient-signed
``u``), ``a_0 = 0``, global step ``1 + a_t``.

* G, the server learning rate (:func:`fedhyper_server` without momentum):
  ``a_t = clip(a_{t-1} + <Delta_{t-1}, Delta_t>, -0.8, 4)``,
  ``x_{t+1} = x_t + (1 + a_t) Delta_t`` (round 0: ``Delta_{-1} = 0``, a plain
  FedAvg step).
* GM, with momentum (the authors' recommended server variant):
  ``a_t = clip(a_{t-1} + <m_{t-1}, Delta_t>, -0.2, 4)``,
  ``x_{t+1} = x_t + (1 + a_t) Delta_t + 0.9 a_t m_{t-1}``,
  ``m_t = Delta_t + 0.9 m_{t-1}`` (``m_{-1} = 0``).
* SL, the server sets the clients' learning rate (:func:`sl_step`):
  ``a_t = a_{t-1} + <Delta_{t-1}, Delta_t>`` without a clip, and the clients
  of the next round use ``eta_0 (1 + a_t)`` within the learning-rate bounds.
  The published code sets the clients' rate from its command-line flag at
  the start of every round, so SL as published may do nothing; this module
  follows the paper's intent: ``a_t``, and with it the rate, carries over
  rounds. The paper clips the rate to ``[1e-3, 0.1]`` for its own tasks;
  here the clip is the task's learning-rate bounds.
* CL, the clients' rate changes step by step (:class:`ClientRate`, run
  inside the engine's compiled local steps as its
  :class:`~fathom_tune.engine.LocalRate`): a client's steps
  ``y_k = y_{k-1} - eta_0 beta_k g(y_{k-1})`` start with ``beta = 1``; after
  each step ``k >= 2``, with ``d_k = y_k - y_{k-1}``,
  ``gamma = min(1.1, 1 + 0.1 <d_k, Delta_{t-1}> / (N C) + <d_k, d_{k-1}>)``
  and ``beta <- clip(gamma beta, 0.1, 10)`` for the next step. ``N C`` is
  the expected number of clients per round, ``Delta_{t-1}`` the previous
  round's FedAvg update (zero in round 0), which the server keeps
  (:func:`keep_update`), and the first comparison (``k = 2``) uses
  ``Delta_{t-1}`` in place of ``d_1``. The published code runs this over
  the steps of each local epoch separately (the first step of every epoch
  changes nothing); here it runs over all of a client's ``K_i`` steps, as
  the paper writes it.
* FULL: GM on the server and CL on the clients.

The authors' clients run SGD with momentum 0.5; this project's clients run
plain SGD (FATHOM's setting), for every tuner alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "CL_BOUNDS",
    "CL_CAP",
    "CL_GLOBAL_WEIGHT",
    "GM_BOUNDS",
    "GM_MOMENTUM",
    "G_BOUNDS",
    "ClientRate",
    "ClientRateState",
    "FedHyperServerState",
    "KeptUpdate",
    "fedhyper_server",
    "keep_update",
    "sl_step",
    "tree_vdot",
]

G_BOUNDS = (-0.8, 4.0)
"""FedHyper-G's clip of ``a_t``."""
GM_BOUNDS = (-0.2, 4.0)
"""FedHyper-GM's clip of ``a_t``."""
GM_MOMENTUM = 0.9
"""FedHyper-GM's momentum factor on ``m``."""
CL_BOUNDS = (0.1, 10.0)
"""FedHyper-CL's clip of the factor ``beta`` on the client's rate."""
CL_CAP = 1.1
"""FedHyper-CL's cap on the per-step growth ``gamma``."""
CL_GLOBAL_WEIGHT = 0.1
"""FedHyper-CL's weight on the agreement with the previous global update."""


def tree_vdot(a, b) -> jax.Array:
    """``<a, b>`` over every leaf of two pytrees of one structure (float32)."""
    leaves = jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y), a, b)
    return sum(jax.tree_util.tree_leaves(leaves), jnp.zeros((), jnp.float32))


class FedHyperServerState(NamedTuple):
    """The server rule's state.

    Attributes:
        a: the accumulated hypergradient ``a_t`` (the step is ``1 + a_t``).
        previous: ``Delta_{t-1}`` (G) or the momentum ``m_{t-1}`` (GM).
    """

    a: jax.Array
    previous: Any


def fedhyper_server(*, momentum: float | None = GM_MOMENTUM, bounds: tuple[float, float] | None = None
                    ) -> optax.GradientTransformation:
    """FedHyper's server learning rate as an optax transformation of the FedAvg update.

    The engine passes the gradient-signed mean update ``u = -Delta_t``; the
    transformation returns the step added to the server model.

    Args:
        momentum: ``None`` for FedHyper-G; a factor (0.9) for FedHyper-GM.
        bounds: the clip of ``a_t`` (default :data:`G_BOUNDS` or
            :data:`GM_BOUNDS`).

    Example:
        >>> import jax.numpy as jnp
        >>> rule = fedhyper_server(momentum=None)
        >>> x = {"w": jnp.zeros(2)}
        >>> state = rule.init(x)
        >>> step, state = rule.update({"w": jnp.array([-1.0, 0.0])}, state)  # Delta_0 = (1, 0)
        >>> step, state = rule.update({"w": jnp.array([-0.5, -0.5])}, state)  # a_1 = 0.5
        >>> float(state.a), step["w"].tolist()
        (0.5, [0.75, 0.75])
    """
    if momentum is not None:
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum!r}")
    lo, hi = bounds if bounds is not None else (G_BOUNDS if momentum is None else GM_BOUNDS)
    lo, hi = float(lo), float(hi)
    if not lo <= 0.0 <= hi:
        raise ValueError(f"bounds must hold 0 (a_0 = 0), got {bounds!r}")

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return FedHyperServerState(a=jnp.zeros((), jnp.float32), previous=zeros)

    def update(updates, state, params=None):
        del params
        delta = jax.tree_util.tree_map(jnp.negative, updates)
        a = jnp.clip(state.a + tree_vdot(state.previous, delta), lo, hi).astype(jnp.float32)
        if momentum is None:
            step = jax.tree_util.tree_map(lambda d: (1.0 + a) * d, delta)
            return step, FedHyperServerState(a=a, previous=delta)
        step = jax.tree_util.tree_map(lambda d, m: (1.0 + a) * d + momentum * a * m, delta, state.previous)
        m = jax.tree_util.tree_map(lambda d, m: d + momentum * m, delta, state.previous)
        return step, FedHyperServerState(a=a, previous=m)

    return optax.GradientTransformation(init, update)


def sl_step(a: float, previous_delta, delta) -> float:
    """FedHyper-SL's accumulator after a round: ``a + <Delta_{t-1}, Delta_t>`` (no clip).

    >>> import numpy as np
    >>> round(sl_step(0.25, {"w": np.array([1.0, 2.0])}, {"w": np.array([0.5, -0.1])}), 6)
    0.55
    """
    return float(a) + float(tree_vdot(previous_delta, delta))



class KeptUpdate(NamedTuple):
    """The state of :func:`keep_update`: the wrapped optimizer's and ``Delta_{t-1}``."""

    inner: Any
    delta: Any


def keep_update(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` as the server optimizer, keeping each round's FedAvg update for the next.

    The state's ``delta`` is the last round's ``Delta = -u`` (zero before
    the first round), which FedHyper-CL's clients read
    (:meth:`ClientRate.context`); the steps are ``inner``'s unchanged.

    >>> import jax.numpy as jnp
    >>> rule = keep_update(optax.sgd(1.0))
    >>> state = rule.init({"w": jnp.zeros(2)})
    >>> step, state = rule.update({"w": jnp.array([0.5, -1.0])}, state)
    >>> step["w"].tolist(), state.delta["w"].tolist()
    ([-0.5, 1.0], [-0.5, 1.0])
    """

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return KeptUpdate(inner=inner.init(params), delta=zeros)

    def update(updates, state, params=None):
        step, inner_state = inner.update(updates, state.inner, params)
        return step, KeptUpdate(inner=inner_state, delta=jax.tree_util.tree_map(jnp.negative, updates))

    return optax.GradientTransformation(init, update)


class ClientRateState(NamedTuple):
    """A client's FedHyper-CL state: ``beta``, the last displacement ``d``, steps taken."""

    beta: jax.Array
    previous: Any
    steps: jax.Array


@dataclasses.dataclass(frozen=True)
class ClientRate:
    """FedHyper-CL's per-step factor on the client's learning rate (see the module docstring).

    An :class:`~fathom_tune.engine.LocalRate`: pass it to
    ``Engine(local_rate=...)`` with a server optimizer wrapped in
    :func:`keep_update`. Each client reports its last ``beta``.

    Attributes:
        clients: ``N C``, the expected number of clients per round.

    Example:
        >>> import jax.numpy as jnp
        >>> rule = ClientRate(clients=2)
        >>> state = rule.init({"w": jnp.array([1.0, 0.0])})  # Delta_{t-1}
        >>> state = rule.update(state, {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.1, 0.0])})
        >>> float(state.beta)  # the first step changes nothing
        1.0
        >>> state = rule.update(state, {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.2, 0.0])})
        >>> round(float(state.beta), 6)  # gamma = 1 + 0.1 * 0.2 / 2 + <d_2, Delta> = 1.21, capped
        1.1
    """

    clients: float

    def __post_init__(self):
        if isinstance(self.clients, bool) or not isinstance(self.clients, (int, float)) or not self.clients > 0:
            raise ValueError(f"clients must be a positive number (N C), got {self.clients!r}")

    @property
    def name(self) -> str:
        return f"fedhyper-cl(clients={float(self.clients):g})"

    def context(self, opt_state) -> Any:
        if not isinstance(opt_state, KeptUpdate):
            raise TypeError(
                "FedHyper-CL reads the previous global update from the server optimizer's state: "
                "wrap the server optimizer in fathom_tune.peers.fedhyper.keep_update(...)"
            )
        return opt_state.delta

    def init(self, context) -> ClientRateState:
        return ClientRateState(
            beta=jnp.ones((), jnp.float32), previous=context, steps=jnp.zeros((), jnp.int32)
        )

    def factor(self, state: ClientRateState) -> jax.Array:
        return state.beta

    def update(self, state: ClientRateState, context, displacement) -> ClientRateState:
        steps = state.steps + 1
        gamma = 1.0 + CL_GLOBAL_WEIGHT * tree_vdot(displacement, context) / float(self.clients)
        gamma = jnp.minimum(CL_CAP, gamma + tree_vdot(displacement, state.previous))
        beta = jnp.clip(gamma * state.beta, *CL_BOUNDS).astype(jnp.float32)
        later = steps >= 2  # step 1 only moves; from step 2 on, beta adapts and d is kept
        return ClientRateState(
            beta=jnp.where(later, beta, state.beta),
            previous=jax.tree_util.tree_map(lambda d, p: jnp.where(later, d, p), displacement, state.previous),
            steps=steps,
        )

    def report(self, state: ClientRateState) -> jax.Array:
        return state.beta
