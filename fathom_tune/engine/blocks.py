"""A round's clients in blocks, and what each round path is given.

* :class:`PathContext`: the configuration a round path
  (:class:`~fathom_tune.engine.resident.ResidentPath`,
  :class:`~fathom_tune.engine.host.HostPath`) gets from the engine once;
* :class:`RoundDraws`: a round's sampled clients, their shuffles and, for the
  round's hyperparameters, their ``K_i``, ``B_int`` and blocks;
* :class:`Block`: one block's per-client inputs, padded to ``client_block``
  clients, with its bucket, example mask and ``1 / B_int`` made once;
* :func:`client_outputs`: the per-client results the blocks left behind.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import numpy as np

from fathom_tune.engine.batching import Shuffles, bucket_size, client_rng, sample_clients
from fathom_tune.engine.programs import Programs
from fathom_tune.hparams import HParams, local_step_counts

__all__ = ["Block", "PathContext", "RoundDraws", "client_outputs"]


@dataclasses.dataclass(frozen=True, eq=False)
class PathContext:
    """What a round path reads: the engine's configuration, given once at construction.

    Attributes:
        programs: the compiled programs (shared by engines of one configuration).
        seed: the run's seed (sampling, shuffles, the model's keys).
        sizes: each client's training examples.
        held: each client's validation examples (0 without client validation).
        examples, validation: a client's training examples and validation part.
        example_bytes: the bytes of one training example.
        buckets, steps_per_call, client_block: as in :class:`~fathom_tune.Engine`.
        clients_per_round: the clients each round samples.
        statistic_start: the client statistic's start (0 without one).
        local_rate: whether a :class:`~fathom_tune.engine.LocalRate` runs.
        validate: whether clients report their validation loss.
        most_epochs: the largest local epochs of the task's bounds.
    """

    programs: Programs
    seed: int
    sizes: np.ndarray
    held: np.ndarray
    examples: Callable[[int], Mapping[str, np.ndarray]]
    validation: Callable[[int], Mapping[str, np.ndarray]]
    example_bytes: int
    buckets: tuple[int, ...]
    steps_per_call: int
    client_block: int
    clients_per_round: int
    statistic_start: float
    local_rate: bool
    validate: bool
    most_epochs: float

    def sampled(self, round_index: int) -> np.ndarray:
        """The clients of round ``round_index`` (:func:`~fathom_tune.engine.sample_clients`)."""
        return sample_clients(self.seed, round_index, len(self.sizes), self.clients_per_round)


def steps_and_batches(hparams: HParams | tuple[HParams, ...], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``K_i`` and ``B_int`` of clients with ``sizes`` examples: under one
    :class:`HParams`, or one each."""
    if isinstance(hparams, HParams):
        b_ints = np.full(len(sizes), hparams.batch_int)
        return local_step_counts(hparams.local_epochs, sizes, hparams.batch_int), b_ints
    b_ints = np.array([hp.batch_int for hp in hparams])
    return local_step_counts(np.array([hp.local_epochs for hp in hparams]), sizes, b_ints), b_ints


def client_blocks(steps: np.ndarray, b_ints: np.ndarray, client_block: int) -> list[np.ndarray]:
    """The round's clients in blocks of at most ``client_block`` with one batch size each,
    clients with similar ``K_i`` together (positions into the round's clients)."""
    if (b_ints == b_ints[0]).all():
        order = np.argsort(-steps, kind="stable")
        return [order[i : i + client_block] for i in range(0, len(order), client_block)]
    out = []
    for b in np.unique(b_ints):
        group = np.flatnonzero(b_ints == b)
        group = group[np.argsort(-steps[group], kind="stable")]
        out.extend(group[i : i + client_block] for i in range(0, len(group), client_block))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One block of a round's clients (at most ``client_block``, one batch size), its
    inputs made once and padded to ``client_block`` clients (padding clients run no
    step).

    Attributes:
        members: the block's clients, as positions into the round's.
        b_int: their batch size; ``bucket``: the compiled batch it pads to.
        inv_b: ``1 / B_int`` (float32).
        clients: each client's index into the task's (int32, padded).
        steps: each client's ``K_i`` (int32, padded with 0).
    """

    members: np.ndarray
    b_int: int
    bucket: int
    inv_b: np.float32
    clients: np.ndarray
    steps: np.ndarray

    @classmethod
    def of(cls, members: np.ndarray, sampled, steps, b_ints, ctx: PathContext) -> Block:
        """The block of the round's clients at positions ``members``."""
        b_int = int(b_ints[members[0]])
        return cls(
            members=members,
            b_int=b_int,
            bucket=bucket_size(b_int, ctx.buckets),
            inv_b=np.float32(1.0 / b_int),
            clients=_padded(sampled, members, ctx.client_block, np.int32),
            steps=_padded(steps, members, ctx.client_block, np.int32),
        )

    def padded(self, values: np.ndarray, dtype) -> np.ndarray:
        """The block's clients' ``values`` (one per round client) padded with zeros to
        ``client_block``."""
        return _padded(values, self.members, len(self.steps), dtype)

    @functools.cached_property
    def example_mask(self) -> np.ndarray:
        """1.0 for the ``B_int`` real slots of a batch of ``bucket``, 0.0 for the padding."""
        mask = np.zeros(self.bucket, np.float32)
        mask[: self.b_int] = 1.0
        return mask

    @property
    def most_steps(self) -> int:
        return int(self.steps.max())


@dataclasses.dataclass(eq=False)
class RoundDraws:
    """Round ``round``'s draws: its clients (indices into the task's) and their
    :class:`~fathom_tune.engine.batching.Shuffles`; once its hyperparameters are
    known (:meth:`for_hparams`), their ``K_i`` and ``B_int``, its blocks
    (:class:`Block`) and their batch plans where they were made ahead (else empty)."""

    round: int
    sampled: np.ndarray
    shuffles: dict[int, Shuffles]
    steps: np.ndarray | None = None
    b_ints: np.ndarray | None = None
    blocks: list[Block] = dataclasses.field(default_factory=list)
    plans: list = dataclasses.field(default_factory=list)

    @classmethod
    def draw(cls, ctx: PathContext, round_index: int) -> RoundDraws:
        """The round's clients and their shuffles (drawn as the plans need them)."""
        sampled = ctx.sampled(round_index)
        shuffles = {int(c): Shuffles(client_rng(ctx.seed, round_index, int(c)), int(ctx.sizes[c])) for c in sampled}
        return cls(round_index, sampled, shuffles)

    def for_hparams(self, ctx: PathContext, hparams: HParams | tuple[HParams, ...]) -> RoundDraws:
        """These draws under ``hparams``: themselves (their blocks and plans) where they
        already hold the same steps and batch sizes, else with new blocks and no plans."""
        steps, b_ints = steps_and_batches(hparams, ctx.sizes[self.sampled])
        if self.steps is not None and np.array_equal(self.steps, steps) and np.array_equal(self.b_ints, b_ints):
            return self
        blocks = [
            Block.of(m, self.sampled, steps, b_ints, ctx) for m in client_blocks(steps, b_ints, ctx.client_block)
        ]
        return dataclasses.replace(self, steps=steps, b_ints=b_ints, blocks=blocks, plans=[])


def _padded(values: np.ndarray, members: np.ndarray, width: int, dtype) -> np.ndarray:
    out = np.zeros(width, dtype)
    out[: len(members)] = values[members]
    return out


def client_outputs(pending, steps: np.ndarray, held: np.ndarray, ctx: PathContext) -> dict[str, np.ndarray]:
    """Each client's statistic, mean training loss, mean validation loss before and after
    its training, and local-rate report, from the blocks' outputs ``pending`` (each
    block's clients and its rows: statistic, summed loss, validation loss before
    and after, report)."""
    n = len(steps)
    out = {
        "statistic": np.full(n, ctx.statistic_start, np.float64),
        "loss": np.zeros(n, np.float64),
        "before": np.zeros(n, np.float64),
        "after": np.zeros(n, np.float64),
        "rate": np.zeros(n, np.float64),
    }
    for members, rows in pending:
        rows = np.asarray(rows)[:, : len(members)]
        out["statistic"][members] = rows[0]
        out["loss"][members] = rows[1] / steps[members]
        out["rate"][members] = rows[4]
        if ctx.validate:
            n_val = np.maximum(held[members], 1)
            out["before"][members] = rows[2] / n_val
            out["after"][members] = rows[3] / n_val
    return out
