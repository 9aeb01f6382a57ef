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

:class:`FedHyper` runs on the one one-run driver (:mod:`fathom_tune.tuning.one_run`):
a round its safety net rejects (non-finite, or blown up) is discarded, the
clients' base rate halved (after ``patience`` rejections: the last accepted
round's) and the server factor ``a`` reset to 0 (:meth:`FedHyperServerState.restarted`;
SL's too); with the net off only a non-finite round is, the rate halved. ``fathom+server`` (:data:`FATHOM_SERVER`, FATHOM with GM's server
rule) lives here with the rule it borrows: FATHOM needs nothing of FedHyper.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_tune.engine import Engine, RoundResult
from fathom_tune.fathom import DIVERGED_LR_FACTOR, Fathom
from fathom_tune.hparams import HParams
from fathom_tune.tuning.one_run import OneRunSchedule, OneRunTuner

__all__ = [
    "CL_BOUNDS", "CL_CAP", "CL_GLOBAL_WEIGHT", "FATHOM_SERVER", "FEDHYPER_A", "FEDHYPER_BETA",
    "FEDHYPER_BETA_MEAN", "FEDHYPER_VARIANTS", "GM_BOUNDS", "GM_MOMENTUM", "G_BOUNDS",
    "ClientRate", "ClientRateState", "FedHyper", "FedHyperServerState", "KeptUpdate",
    "fedhyper_server", "keep_update", "sl_step", "tree_vdot"
]

# FedHyper's own record keys (the shared schema is fathom_tune.storage.record's)
FEDHYPER_A = "fedhyper.a"
"""FedHyper's ``a_t`` after the round (server step ``1 + a_t``; SL's client rate ``eta_0 (1 + a_t)``)."""
FEDHYPER_BETA = "fedhyper.beta"
"""FedHyper-CL: each sampled client's factor ``beta`` on ``eta_0`` after its last local step."""
FEDHYPER_BETA_MEAN = "fedhyper.beta_mean"
"""FedHyper-CL: the mean of the round's :data:`FEDHYPER_BETA` (a history column)."""

G_BOUNDS, GM_BOUNDS = (-0.8, 4.0), (-0.2, 4.0)
"""FedHyper-G's and FedHyper-GM's clips of ``a_t``."""
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

    def restarted(self) -> FedHyperServerState:
        """The state after a rejected round (:func:`fathom_tune.tuning.safety.restart_server`):
        ``a`` back to 0, ``previous`` kept."""
        return self._replace(a=jnp.zeros_like(self.a))


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


FEDHYPER_VARIANTS = ("g", "gm", "sl", "cl", "full")
"""FedHyper's variants: server rate (G), server rate with momentum (GM), server-set client
rate (SL), client rate adapted step by step (CL), and GM with CL (FULL)."""


class _FedHyperSchedule(OneRunSchedule):
    def __init__(self, engine: Engine, variant: str):
        task = engine.task
        self.variant = variant
        self.start = task.init_hparams
        self.bounds = task.bounds
        self.eta0 = float(task.init_hparams.learning_rate)
        self.a = 0.0  # and SL's Delta_{t-1}:
        self.previous = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), engine.init().params)

    def _rate(self) -> float:
        eta = self.eta0 * (1.0 + self.a) if self.variant == "sl" else self.eta0
        lo, hi = self.bounds.lower.learning_rate, self.bounds.upper.learning_rate
        return min(max(eta, lo), hi)

    def propose(self, round_index: int) -> HParams:
        return dataclasses.replace(self.start, learning_rate=self._rate())

    def learn(self, result: RoundResult, accepted: bool) -> dict:
        if not accepted:
            self.eta0 = max(self.eta0 * DIVERGED_LR_FACTOR, self.bounds.lower.learning_rate)
            return {}
        if self.variant == "sl":
            delta = jax.tree_util.tree_map(lambda u: -np.asarray(u, np.float32), result.update)
            self.a = sl_step(self.a, self.previous, delta)
            self.previous = delta
        elif self.variant != "cl":
            server = result.opt_state
            self.a = float((server.inner if isinstance(server, KeptUpdate) else server).a)
        attrs = {} if self.variant == "cl" else {FEDHYPER_A: self.a}
        if self.variant in _CLIENT_RATE:
            attrs[FEDHYPER_BETA] = [float(b) for b in result.local_rate]
            attrs[FEDHYPER_BETA_MEAN] = float(np.mean(result.local_rate))
        return attrs

    def rejected(self, result: RoundResult, rejection) -> dict:
        back = rejection.back_to if rejection.reset else None
        eta0 = self.eta0 * DIVERGED_LR_FACTOR if back is None else back.learning_rate
        self.eta0, self.a = max(eta0, self.bounds.lower.learning_rate), 0.0
        return {}

    def returned(self) -> HParams:
        return self.propose(-1)

    def trees(self) -> dict:
        return {
            "fedhyper": {"a": np.asarray(self.a, np.float64), "eta0": np.asarray(self.eta0, np.float64)},
            "previous": self.previous,
        }

    def restore(self, trees: dict) -> None:
        self.a = float(trees["fedhyper"]["a"])
        self.eta0 = float(trees["fedhyper"]["eta0"])
        self.previous = trees["previous"]


@dataclasses.dataclass(frozen=True)
class FedHyper(OneRunTuner):
    """FedHyper (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156) as a one-run tuner.

    The clients run plain SGD with the task's starting hyperparameters (the
    authors use SGD with momentum 0.5); the variant (``"g"``, ``"gm"``,
    ``"sl"``, ``"cl"``, ``"full"``: see the module docstring) adapts a learning
    rate from inner products of successive global updates. The
    hyperparameters reported are the clients' starting ones; each round's
    trial records the server step (:data:`FEDHYPER_A`), CL's factors
    (:data:`FEDHYPER_BETA`, one per client) and their mean.

    Attributes:
        name: the registry name.
        variant: one of :data:`FEDHYPER_VARIANTS`.

    Example:
        >>> import fathom_tune
        >>> out = FedHyper("demo-gm", "gm").run(fathom_tune.tasks.digits().replace(num_rounds=3))
        >>> len(out.study.trials)
        3
    """

    name: str = "fedhyper"
    variant: str = "gm"

    def __post_init__(self):
        if self.variant not in FEDHYPER_VARIANTS:
            raise ValueError(f"variant must be one of {FEDHYPER_VARIANTS}, got {self.variant!r}")

    def schedule_for(self, engine: Engine) -> OneRunSchedule:
        return _FedHyperSchedule(engine, self.variant)

    def settings(self) -> dict:
        return {"method": "fedhyper", "variant": self.variant}

    def engine_options(self, task) -> dict:
        options = {"server_optimizer": _SERVER_RULES[self.variant]} if self.variant in _SERVER_RULES else {}
        if self.variant in _CLIENT_RATE:
            options["local_rate"] = ClientRate(clients=task.clients_per_round)
        return options


_SERVER_RULES = {"g": fedhyper_server(momentum=None), "gm": fedhyper_server(momentum=GM_MOMENTUM)}
_SERVER_RULES.update({"cl": keep_update(optax.sgd(1.0)), "full": keep_update(_SERVER_RULES["gm"])})
"""Each variant's server optimizer (SL keeps plain FedAvg's); one object per rule, so
engines with the same rule share compiled programs."""
_CLIENT_RATE = ("cl", "full")
"""The variants whose clients adapt their rate step by step (FedHyper-CL)."""

FATHOM_SERVER = Fathom("fathom+server", server_optimizer=_SERVER_RULES["gm"])
"""``fathom+server``: FATHOM for the clients with FedHyper-GM's server rate (the rule object
``fedhyper-gm`` uses, so the two share compiled programs)."""
