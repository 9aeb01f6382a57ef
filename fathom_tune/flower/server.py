"""The server's side of a FATHOM round in Flower, Optuna apart: nodes, replies, ``u``, ``G``, cost.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106),
server side of round ``t``: :func:`sample_nodes` picks the round's nodes;
from the model ``x0`` sent and the replies of the clients ``i`` (weights
``w_i = n_i / sum n``) :func:`aggregate` forms

* ``Delta_i = x0 - x_{K_i}``, ``u = sum_i w_i Delta_i`` and
  ``G = sum_i w_i phi_i`` (:func:`fathom_tune.aggregate_round`);
* the round's training loss ``sum_i w_i loss_i``;
* the round diverged when that loss, ``u`` or a ``phi_i`` is not finite.

``H`` needs the run's moving average ``m`` and is the strategy's
(:class:`~fathom_tune.flower.FathomFedAvg`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Message

from fathom_tune.engine import Cost, sample_clients
from fathom_tune.fathom import aggregate_round
from fathom_tune.flower import protocol
from fathom_tune.hparams import HParams

__all__ = ["Aggregate", "Replies", "aggregate", "collect", "round_cost", "sample_nodes"]

_log = logging.getLogger(__name__)


def sample_nodes(
    grid,
    *,
    seed: int,
    round_index: int,
    fraction: float,
    min_train: int,
    min_available: int,
    wait: float,
) -> list[int]:
    """The round's nodes: ``max(int(fraction * connected), min_train)`` of them, drawn by
    ``(seed, round_index)`` from the sorted node ids (the engine's client sampling rule).

    Waits up to ``wait`` seconds for ``max(that, min_available)`` nodes to be connected.

    Raises:
        RuntimeError: fewer nodes after ``wait`` seconds; the message says how many.
    """
    deadline = time.monotonic() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        size = max(int(len(nodes) * fraction), min_train)
        need = max(size, min_available)
        if len(nodes) >= need:
            return [nodes[i] for i in sample_clients(seed, round_index, len(nodes), size)]
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"round {round_index}: {len(nodes)} node(s) connected after waiting {wait} s; "
                f"this round needs {need} (min_available_nodes={min_available}, "
                f"min_train_nodes={min_train}, fraction_train={fraction})"
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


@dataclasses.dataclass(frozen=True)
class Replies:
    """A round's good replies, in the order they came.

    Attributes:
        node_ids: the replying nodes.
        params: each reply's model ``x_{K_i}``, ``{name: array}``.
        num_examples, phis, train_losses, local_steps: each reply's metrics.
    """

    node_ids: tuple[int, ...]
    params: tuple[dict, ...]
    num_examples: np.ndarray
    phis: np.ndarray
    train_losses: np.ndarray
    local_steps: np.ndarray


def collect(
    messages: Iterable[Message], x0: dict, hparams: HParams, round_index: int
) -> tuple[Replies, int]:
    """The good replies of round ``round_index``, and how many replied with an error.

    Error replies (a node that failed or went away) are logged and left
    out, as FedAvg does. A client that ran another number of steps than
    FATHOM's ``K_i`` is logged.

    Raises:
        ValueError: a reply lacks a record, a metric or an array, or its
            arrays do not match ``x0`` (:func:`~fathom_tune.flower.protocol.read_reply`).
    """
    nodes, params, metrics, failed = [], [], [], 0
    for msg in messages:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed += 1
            _log.warning(
                "round %d: node %d replied with an error: %s", round_index, node, msg.error.reason
            )
            continue
        arrays, values = protocol.read_reply(msg.content, x0, node)
        want = hparams.local_steps(int(values[protocol.NUM_EXAMPLES]))
        if values[protocol.LOCAL_STEPS] != want:
            _log.warning(
                "round %d: node %d ran %r local steps; FATHOM's K_i = max(ceil(E n_i / B_int), 1) "
                "is %d",
                round_index,
                node,
                values[protocol.LOCAL_STEPS],
                want,
            )
        nodes.append(node)
        params.append(arrays)
        metrics.append(values)

    def column(key, dtype):
        return np.array([m[key] for m in metrics], dtype)

    replies = Replies(
        node_ids=tuple(nodes),
        params=tuple(params),
        num_examples=column(protocol.NUM_EXAMPLES, np.int64),
        phis=column(protocol.PHI, np.float64),
        train_losses=column(protocol.TRAIN_LOSS, np.float64),
        local_steps=column(protocol.LOCAL_STEPS, np.int64),
    )
    return replies, failed


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """What the server forms from a round's replies.

    Attributes:
        update: ``u``, ``{name: array}`` in the model's dtypes' accumulator.
        G: the local hypergradient.
        train_loss: the example-weighted mean of the clients' losses.
        finite: ``False`` when the round diverged.
    """

    update: dict
    G: float
    train_loss: float
    finite: bool

    def apply(self, x0: dict) -> dict:
        """FedAvg's server step ``x <- x0 - u``, in ``x0``'s dtypes."""
        return {k: (x0[k] - self.update[k]).astype(x0[k].dtype) for k in x0}


def aggregate(x0: dict, replies: Replies) -> Aggregate:
    """``u``, ``G`` and the loss of at least one reply (see the module docstring)."""
    if not replies.node_ids:
        raise ValueError("aggregate needs at least one reply")
    deltas = [{k: x0[k] - params[k] for k in x0} for params in replies.params]
    u, G = aggregate_round(deltas, replies.phis, replies.num_examples)
    u = {k: np.asarray(v) for k, v in u.items()}
    n = replies.num_examples
    loss = float(np.dot(n / n.sum(), replies.train_losses))
    finite = (
        math.isfinite(loss)
        and bool(np.isfinite(replies.phis).all())
        and all(bool(np.isfinite(v).all()) for v in u.values())
    )
    return Aggregate(update=u, G=float(G), train_loss=loss, finite=finite)


def round_cost(x0: dict, replies: Replies, hparams: HParams, sampled: int, seconds: float) -> Cost:
    """The round's :class:`~fathom_tune.Cost`.

    ``examples = sum_i K_i B_int`` and ``steps = sum_i K_i`` over the
    replies; the model went to ``sampled`` nodes and came back with its
    metrics (8 bytes each) from each reply. Bytes count the payload, not
    Flower's message overhead.
    """
    return Cost.of_round(
        replies.local_steps,
        hparams.batch_int,
        model_bytes=sum(v.nbytes for v in x0.values()),
        reply_scalar_bytes=8 * len(protocol.REPLY_METRICS),
        sent=sampled,
        replies=len(replies.node_ids),
        seconds=seconds,
    )
