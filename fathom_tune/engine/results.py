"""What a FedAvg round produces and consumes: the ledger (:class:`Cost`), the server state
and a round's result (see :mod:`fathom_tune.engine`)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fathom_tune.hparams import HParams

__all__ = ["Cost", "RoundResult", "ServerState"]


@dataclasses.dataclass(frozen=True)
class Cost:
    """What training consumed: one round's, or a sum over rounds or trials.

    Attributes:
        rounds: communication rounds.
        examples: client examples processed (one per example in every local
            gradient, i.e. ``sum_i K_i * B_int``).
        steps: local SGD steps, ``sum_i K_i``.
        bytes_down: server to clients: the model, once per sampled client.
        bytes_up: clients to server: each client's update plus its scalars (the
            engine's: three float32, its example count, training loss and client
            statistic, and two float32 validation losses with client validation;
            a Flower reply's: 8 bytes per metric).
        seconds: wall-clock seconds.
    """

    rounds: int = 0
    examples: int = 0
    steps: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0

    @classmethod
    def of_round(
        cls,
        local_steps,
        batch_sizes,
        *,
        model_bytes: int = 0,
        reply_scalar_bytes: int = 0,
        sent: int | None = None,
        replies: int | None = None,
        extra_examples: int = 0,
        seconds: float = 0.0,
        rounds: int = 1,
    ) -> Cost:
        """What clients that ran ``local_steps`` (``K_i``) at ``batch_sizes`` (``B_int``,
        one per client or one for all) cost: the one rule of the engine's rounds, the
        Flower server's and a projected run's.

        ``examples = sum_i K_i B_int + extra_examples`` (e.g. validation passes),
        ``steps = sum_i K_i``; the model (``model_bytes``) goes to ``sent`` clients
        (default: every client of ``local_steps``) and comes back from
        ``replies`` (default ``sent``), each reply with ``reply_scalar_bytes`` of
        scalars besides the model (each caller documents its own). ``rounds``: the
        rounds these clients span (1, or every round of a projected run).

        >>> Cost.of_round([7, 3], 20, model_bytes=100, reply_scalar_bytes=12, seconds=0.5)
        Cost(rounds=1, examples=200, steps=10, bytes_down=200, bytes_up=224, seconds=0.5)
        """
        steps = np.asarray(local_steps, np.int64)
        sent = len(steps.ravel()) if sent is None else int(sent)
        replies = sent if replies is None else int(replies)
        return cls(
            rounds=int(rounds),
            examples=int(np.sum(steps * np.asarray(batch_sizes, np.int64))) + int(extra_examples),
            steps=int(steps.sum()),
            bytes_down=sent * int(model_bytes),
            bytes_up=replies * (int(model_bytes) + int(reply_scalar_bytes)),
            seconds=float(seconds),
        )

    # Field by field, not through dataclasses.astuple/asdict: every round adds one
    # (about 20 against 3 microseconds).
    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(
            self.rounds + other.rounds,
            self.examples + other.examples,
            self.steps + other.steps,
            self.bytes_down + other.bytes_down,
            self.bytes_up + other.bytes_up,
            self.seconds + other.seconds,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "rounds": self.rounds,
            "examples": self.examples,
            "steps": self.steps,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "seconds": self.seconds,
        }


@dataclasses.dataclass(frozen=True)
class ServerState:
    """The server's model and optimizer state after ``round`` rounds."""

    params: object
    opt_state: object
    round: int = 0


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What one round produced.

    Attributes:
        round: the round's index (0-based).
        hparams: the hyperparameters the round used.
        client_ids: the sampled clients.
        num_examples: ``n_i`` of each sampled client.
        local_steps: ``K_i`` of each sampled client.
        statistic: the engine's :class:`ClientStatistic` of each sampled
            client (e.g. FATHOM's ``phi_i``), or ``None`` when it has none.
        client_loss: each client's mean minibatch loss over its local steps.
        train_loss: example-weighted mean of ``client_loss``.
        update: the weighted mean update ``u`` (gradient-signed pytree).
        cost: what this round consumed.
        client_hparams: each sampled client's hyperparameters when the round
            gave clients their own (then ``hparams`` is the round's summary),
            else None.
        validation_before: each client's mean loss on its validation part
            under the server model, when the engine holds one out, else None.
        validation_after: the same under the client's model after training.
        validation_size: each client's validation examples, or None.
        opt_state: the server optimizer's state after this round's update.
        local_rate: each client's :class:`~fathom_tune.engine.LocalRate` report
            (e.g. FedHyper-CL's last factor) when the engine has a rule, else None.
    """

    round: int
    hparams: HParams
    client_ids: tuple
    num_examples: np.ndarray
    local_steps: np.ndarray
    statistic: np.ndarray | None
    client_loss: np.ndarray
    train_loss: float
    update: object
    cost: Cost
    client_hparams: tuple[HParams, ...] | None = None
    validation_before: np.ndarray | None = None
    validation_after: np.ndarray | None = None
    validation_size: np.ndarray | None = None
    opt_state: object = None
    local_rate: np.ndarray | None = None

    @property
    def finite(self) -> bool:
        """Whether the loss and the update are finite (no divergence)."""
        if not math.isfinite(self.train_loss):
            return False
        return bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(self.update)))
