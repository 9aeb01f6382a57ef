"""The resident round path: every client's data on the devices, a block of clients in
one compiled call.

For small models, whose rounds are bound by dispatch, not compute (see
:mod:`fathom_tune.engine.simulator`): the data goes to the devices once, and
each block's call gathers its batches there from a batch plan of example
indices, loops over the chunks of steps its longest client needs, forms the
weighted update and applies the server update (the last block's is the
round's). The host sends only the plan and a few packed scalars, and draws
the next round's clients, shuffles and (for the same hyperparameters) plans
while the devices compute.
"""

from __future__ import annotations

import numpy as np

from fathom_tune.engine.batching import batch_plan, bucket_size
from fathom_tune.engine.blocks import Block, PathContext, RoundDraws
from fathom_tune.hparams import HParams, local_step_counts

__all__ = ["ResidentPath"]

PLAN_ENTRIES = 1 << 20
"""A plan's first size in a bucket holds at most this many example indices (it grows
past that when a round needs more)."""


class ResidentPath:
    """Rounds on client data resident on the devices.

    Owns what it keeps between rounds: the resident data (loaded at the first
    round), the rows a plan holds per bucket (its rungs, which only grow), the
    next round's draws made while the current one computes, and the zero update
    every round starts its sum from.
    """

    def __init__(self, ctx: PathContext):
        self._ctx = ctx
        self._data: dict | None = None
        self._zero_update = None
        self._rungs: dict[int, int] = {}  # bucket -> chunks its plans hold
        self._ahead: RoundDraws | None = None  # the next round's draws, made while one computes

    @staticmethod
    def fits(sizes: np.ndarray, held: np.ndarray, example_bytes: int, limit: int) -> bool:
        """Whether every client's examples (``sizes`` for training, ``held`` for
        validation) fit in ``limit`` bytes."""
        return int(sizes.sum() + held.sum()) * example_bytes <= limit

    def draws(self, round_index: int, hparams: HParams | tuple[HParams, ...]) -> RoundDraws:
        """The round's draws under ``hparams``: those made ahead for it (with their plans
        when the steps and batch sizes are the same), else new ones."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.round != round_index:
            ahead = RoundDraws.draw(self._ctx, round_index)
        return ahead.for_hparams(self._ctx, hparams)

    def train(self, state, draws: RoundDraws, etas, weights):
        """Each block in one compiled call on the resident data, the server update
        included (the last block's is the round's). Returns the new parameters, the
        optimizer state, the update and each block's clients and outputs."""
        ctx = self._ctx
        data = self._resident_data()
        x0, opt_state = state.params, state.opt_state
        if self._zero_update is None:
            self._zero_update = ctx.programs.zeros(x0)
        u = self._zero_update
        ready = draws.plans or [None] * len(draws.blocks)
        new_params, new_opt, pending = x0, opt_state, []
        for block, plan in zip(draws.blocks, ready):
            eta, w = block.padded(etas, np.float32), block.padded(weights, np.float32)
            ints = np.concatenate([block.steps, block.clients, [block.b_int]]).astype(np.int32)
            floats = np.concatenate([eta, w, [block.inv_b, ctx.statistic_start]]).astype(np.float32)
            if plan is None or plan.shape[1] != self._plan_rows(block.bucket, block.most_steps):
                plan = self._block_plan(block, draws)
            self._rungs[block.bucket] = plan.shape[1] // ctx.steps_per_call
            val = self._validation(block) if ctx.validate else None
            # Every call also applies the server update (one optax step, next to
            # nothing); the last block's is the round's.
            new_params, new_opt, u, out = ctx.programs.block_round(
                x0, opt_state, u, data["train"], plan, ints, floats, ctx.seed, state.round, val
            )
            pending.append((block.members, out))
        return new_params, new_opt, u, pending

    def draw_ahead(self, round_index: int, hparams: HParams | None) -> None:
        """While the devices compute the current round: samples round ``round_index``'s
        clients, draws their first shuffle and, for ``hparams`` (an
        :class:`~fathom_tune.HParams`, or None for per-client hyperparameters), its
        blocks and batch plans. :meth:`draws` hands them to that round when it has
        the same steps and batch sizes (every round of a static run); they are the
        draws it would make itself, taken off the critical path."""
        ahead = RoundDraws.draw(self._ctx, round_index)
        for sh in ahead.shuffles.values():
            sh.take(1)
        if hparams is not None:
            ahead = ahead.for_hparams(self._ctx, hparams)
            ahead.plans = [self._block_plan(block, ahead) for block in ahead.blocks]
        self._ahead = ahead

    def _plan_rows(self, bucket: int, most_steps: int) -> int:
        """Rows of a plan in ``bucket`` (the compiled loop runs only the chunks needed):
        room for the most steps the task's bounds allow in this bucket, so learning
        rate and epochs compile nothing; past that, rounded up to a power of two."""
        s_call = self._ctx.steps_per_call
        n_chunks = -(-most_steps // s_call)
        rung = self._rungs.get(bucket) or self._initial_rung(bucket)
        return s_call * max(rung, 1 << max(n_chunks - 1, 0).bit_length())

    def _initial_rung(self, bucket: int) -> int:
        """Chunks a plan in ``bucket`` holds at first: enough for the largest local
        epochs of ``task.bounds``, the largest client and the smallest batch size in
        the bucket (a power of two; at most :data:`PLAN_ENTRIES` plan entries)."""
        ctx = self._ctx
        smallest = max([0] + [b for b in ctx.buckets if b < bucket]) + 1
        k_max = int(local_step_counts(ctx.most_epochs, int(ctx.sizes.max()), smallest))
        rung = 1 << max(-(-k_max // ctx.steps_per_call) - 1, 0).bit_length()
        while rung > 1 and ctx.client_block * ctx.steps_per_call * rung * bucket > PLAN_ENTRIES:
            rung //= 2
        return rung

    def _block_plan(self, block: Block, draws: RoundDraws) -> np.ndarray:
        """A block's batches as indices into the resident data, ``[client_block, rows,
        bucket]`` (rows: :meth:`_plan_rows`): client ``j``'s first ``K_j`` rows hold
        its batches of ``B_int`` examples (padding slots point at its first example
        and are masked); the rows of steps it does not run point at example 0 and
        are never applied."""
        rows = self._plan_rows(block.bucket, block.most_steps)
        plan = np.zeros((self._ctx.client_block, rows, block.bucket), np.int32)
        offsets = self._resident_data()["offsets"]
        for j, (c, k) in enumerate(zip(block.clients[: len(block.members)].tolist(), block.steps.tolist())):
            batch_plan(draws.shuffles[c], k, block.b_int, into=plan[j], offset=int(offsets[c]))
        return plan

    def _resident_data(self) -> dict:
        """Every client's training (and validation) examples on the devices, loaded at
        the first round."""
        if self._data is not None:
            return self._data
        ctx = self._ctx
        n = len(ctx.sizes)
        parts = [ctx.examples(i) for i in range(n)]
        offsets = np.concatenate([[0], np.cumsum(ctx.sizes)[:-1]]).astype(np.int32)
        train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        data = {"offsets": offsets, "train": ctx.programs.put(train)}
        if ctx.validate:
            vparts = [ctx.validation(i) for i in range(n)]
            data["val_offsets"] = np.concatenate([[0], np.cumsum(ctx.held)[:-1]]).astype(np.int32)
            data["val"] = ctx.programs.put({k: np.concatenate([p[k] for p in vparts]) for k in vparts[0]})
        self._data = data
        return data

    def _validation(self, block: Block):
        """The block's validation examples as indices into the resident data, and their
        masks, padded to the largest client's part (one shape for every block)."""
        ctx, data = self._ctx, self._resident_data()
        bucket = bucket_size(max(int(ctx.held.max()), 1), ctx.buckets)
        idx = np.zeros((ctx.client_block, bucket), np.int32)
        mask = np.zeros((ctx.client_block, bucket), np.float32)
        for j, c in enumerate(block.clients[: len(block.members)]):
            n = int(ctx.held[c])
            idx[j] = data["val_offsets"][c]
            idx[j, :n] += np.arange(n, dtype=np.int32)
            mask[j, :n] = 1.0
        return data["val"], idx, mask
