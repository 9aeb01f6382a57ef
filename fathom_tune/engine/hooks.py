"""The engine's public hooks: what a tuner may fold into the clients' compiled local steps.

* :class:`ClientStatistic`: a per-client scalar folded over the local steps
  (FATHOM's ``phi``, :class:`fathom_tune.fathom.LocalAgreement`);
* :class:`LocalRate`: a rule that scales a client's learning rate step by step
  (FedHyper-CL, :class:`fathom_tune.peers.fedhyper.ClientRate`).

Pass one to :class:`fathom_tune.engine.Engine` (``client_statistic=``,
``local_rate=``); an engine given neither computes neither.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

__all__ = ["ClientStatistic", "LocalRate"]


class ClientStatistic(Protocol):
    """A per-client scalar folded over the local steps, computed inside the compiled step.

    The engine starts each client at :attr:`initial` and, after every local
    step ``x_{k+1} = x_k - eta * g_k`` that the client runs, sets
    ``stat = update(stat, x0, g_k, x_{k+1})``; steps past the client's ``K_i``
    leave it unchanged. Implementations are hashable (frozen dataclasses):
    engines with equal statistics share compiled programs. FATHOM's ``phi``
    is one (:class:`fathom_tune.fathom.LocalAgreement`); static runs use none.
    """

    name: str
    initial: float

    def update(self, stat: jax.Array, x0: Any, grad: Any, params: Any) -> jax.Array:
        """The statistic after one more local step (traced under ``jax.jit``)."""


class LocalRate(Protocol):
    """A rule that scales each client's learning rate step by step, inside the compiled steps.

    Each client starts at ``state = init(context)``, where ``context =
    context(opt_state)`` is read from the server optimizer's state at the
    round's start (e.g. the previous round's global update). Local step
    ``k`` runs with learning rate ``eta * factor(state)``; after it, with the
    step's displacement ``d = x_{k+1} - x_k``, ``state = update(state,
    context, d)``. Steps past the client's ``K_i`` leave the state unchanged;
    ``report(state)`` (a scalar per client) comes back in the round's result.
    Implementations are hashable (frozen dataclasses) and their ``name``
    says everything that changes what they do: engines with equal rules
    share compiled programs and checkpoints record the name.
    FedHyper-CL is one (:class:`fathom_tune.peers.fedhyper.ClientRate`).
    """

    name: str

    def context(self, opt_state: Any) -> Any:
        """What every client of the round reads (traced; from the server optimizer's state)."""

    def init(self, context: Any) -> Any:
        """A client's state before its first local step."""

    def factor(self, state: Any) -> jax.Array:
        """The factor on the client's learning rate for its next step."""

    def update(self, state: Any, context: Any, displacement: Any) -> Any:
        """The state after a local step that moved the client's model by ``displacement``."""

    def report(self, state: Any) -> jax.Array:
        """A scalar per client for the round's result (e.g. its last factor)."""
