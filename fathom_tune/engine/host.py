"""The host round path: a block's batches gathered on the host, one compiled call per
chunk of steps.

For compute-bound models on XLA:CPU (convolutions, long unrolled LSTMs) and
for client data too large to keep on the devices (see
:mod:`fathom_tune.engine.simulator`): a compiled loop around a convolution
step was measured many times slower, so each call runs ``steps_per_call``
unrolled steps of a block on batches the host gathered, writing the new
models into a spare buffer it donates.
"""

from __future__ import annotations

import numpy as np

from fathom_tune.engine.batching import batch_plan, bucket_size
from fathom_tune.engine.blocks import Block, PathContext, RoundDraws
from fathom_tune.hparams import HParams

__all__ = ["GATHER_BYTES", "HostPath"]

GATHER_BYTES = 8 << 20
"""Batches are gathered for as many calls at once as fit in this many bytes (a gather
per call cost about 0.1 ms of host CPU, 1% of a small conv step)."""


class HostPath:
    """Rounds whose batches the host gathers from the clients' examples.

    Keeps nothing between rounds: each round draws its clients and shuffles
    afresh, and each block's gathers and the spare buffer the new models are
    written into live for the round.
    """

    def __init__(self, ctx: PathContext):
        self._ctx = ctx

    def draws(self, round_index: int, hparams: HParams | tuple[HParams, ...]) -> RoundDraws:
        """The round's clients, shuffles and blocks under ``hparams``."""
        return RoundDraws.draw(self._ctx, round_index).for_hparams(self._ctx, hparams)

    def draw_ahead(self, round_index: int, hparams: HParams | None) -> None:
        """Nothing: this path draws each round when it runs."""

    def train(self, state, draws: RoundDraws, etas, weights):
        """Each block's chunks of steps, then the server update. Returns the new
        parameters, the optimizer state, the update and each block's clients and
        outputs."""
        ctx, progs = self._ctx, self._ctx.programs
        x0 = state.params
        u = progs.zeros(x0)
        p_block, s_call = ctx.client_block, ctx.steps_per_call
        pending, spare = [], None
        for block in draws.blocks:
            n_calls = -(-block.most_steps // s_call)
            plans = self._plans(block, draws, n_calls * s_call)
            params = progs.broadcast(x0)
            if spare is None:  # each call writes the new models here; later blocks reuse it
                spare = progs.broadcast(x0)
            ctx_rate, rate = progs.start_rates(state.opt_state) if ctx.local_rate else ((), ())
            stat_b = np.full(p_block, ctx.statistic_start, np.float32)
            loss_b = np.zeros(p_block, np.float32)
            # What every call of the block reads, on the devices once (not sent per call).
            ex_mask, n_steps, seed, rnd, cidx, eta, inv_b = progs.put(
                (block.example_mask, block.steps, ctx.seed, state.round, block.clients,
                 block.padded(etas, np.float32), block.inv_b)
            )
            if ctx.validate:
                val_batch, val_mask = self._validation(block)
                before_b = progs.validation_loss(params, val_batch, val_mask)
            # Batches gathered for several calls at once (up to GATHER_BYTES), each
            # call's a view: one gather per client and feature, not one per call.
            span = max(1, GATHER_BYTES // max(1, p_block * s_call * block.bucket * ctx.example_bytes))
            for call in range(n_calls):
                if call % span == 0:
                    gathered = self._gather(block, plans, slice(call * s_call, (call + span) * s_call))
                at = (call % span) * s_call
                batches = {key: arr[:, at : at + s_call] for key, arr in gathered.items()}
                new, stat_b, loss_b, rate = progs.local_steps(
                    x0, ctx_rate, params, spare, stat_b, loss_b, rate, batches, ex_mask, n_steps, seed, rnd, cidx,
                    call * s_call, eta, inv_b,
                )
                params, spare = new, params
            if ctx.validate:
                after_b = progs.validation_loss(params, val_batch, val_mask)
            else:
                before_b = after_b = loss_b
            report_b = progs.report_rates(rate) if ctx.local_rate else loss_b
            u = progs.accumulate(u, x0, params, block.padded(weights, np.float32))
            pending.append((block.members, [stat_b, loss_b, before_b, after_b, report_b]))
        new_params, opt_state = progs.server_update(x0, state.opt_state, u)
        return new_params, opt_state, u, pending

    def _plans(self, block: Block, draws: RoundDraws, rows: int) -> list[np.ndarray]:
        """Each member's example indices ``[rows, bucket]``: its ``K_i`` batches of
        ``B_int`` (:func:`batch_plan`); padding slots and the rows of inactive steps
        point at example 0 and are masked."""
        return [
            batch_plan(draws.shuffles[c], k, block.b_int, into=np.zeros((rows, block.bucket), np.int64))
            for c, k in zip(block.clients[: len(block.members)].tolist(), block.steps.tolist())
        ]

    def _gather(self, block: Block, plans, steps: slice):
        """The block's batches of ``steps``: ``[client_block, steps, bucket, ...]`` per
        feature; slots past the block's clients repeat its first client."""
        p_block, n = self._ctx.client_block, len(block.members)
        examples = [self._ctx.examples(c) for c in block.clients[:n].tolist()]
        examples += examples[:1] * (p_block - n)
        rows = [plan[steps] for plan in plans]
        rows += rows[:1] * (p_block - n)
        if p_block == 1:  # one client: its batches as they come out of the gather
            return {key: arr[rows[0]][None] for key, arr in examples[0].items()}
        return {key: np.stack([ex[key][r] for ex, r in zip(examples, rows)]) for key in examples[0]}

    def _validation(self, block: Block):
        """The block's validation parts, padded to one bucket, and their masks."""
        ctx, n = self._ctx, len(block.members)
        clients = block.clients[:n].tolist()
        held = [int(ctx.held[c]) for c in clients]
        bucket = bucket_size(max(max(held), 1), ctx.buckets)
        first = ctx.validation(clients[0])
        out = {}
        mask = np.zeros((ctx.client_block, bucket), np.float32)
        for key, arr in first.items():
            buf = np.zeros((ctx.client_block, bucket) + arr.shape[1:], arr.dtype)
            for j, c in enumerate(clients):
                part = ctx.validation(c)[key]
                buf[j, : len(part)] = part
            out[key] = buf
        for j, k in enumerate(held):
            mask[j, :k] = 1.0
        return out, mask
