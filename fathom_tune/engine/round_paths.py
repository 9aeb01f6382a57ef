"""How the engine trains a block of clients: the two paths of a round.

:class:`~fathom_tune.engine.Engine` runs every round through one of them
(see its module docstring):

* resident: every client's data on the devices, a block of clients in one
  compiled call (batches gathered on the device, the server update
  included), the next round's sample and shuffles drawn while it runs;
* host-gathered: a block's batches gathered on the host, one compiled call
  per chunk of steps (compute-bound models on XLA:CPU).

Both return ``(new params, optimizer state, update, pending)`` where
``pending`` lists each block's clients and its per-client outputs
(statistic, summed loss, validation loss before and after, the local rate's
report).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fathom_tune.engine.batching import Shuffles, batch_indices, bucket_size, client_rng
from fathom_tune.hparams import HParams

GATHER_BYTES = 8 << 20
"""On the host path, batches are gathered for as many calls at once as fit in this
many bytes (a gather per call cost about 0.1 ms of host CPU, 1% of a small conv step)."""

__all__: list[str] = []


@dataclasses.dataclass
class _Ahead:
    """Round ``round``'s draws, made while the previous round computed: its clients,
    their :class:`Shuffles` and, for the hyperparameters expected, the steps, batch
    sizes, blocks and batch plans (empty when none were expected)."""

    round: int
    sampled: np.ndarray
    shuffles: dict
    steps: np.ndarray | None = None
    b_ints: np.ndarray | None = None
    blocks: list = dataclasses.field(default_factory=list)
    plans: list = dataclasses.field(default_factory=list)


class _RoundPaths:
    """The engine's round paths, as methods of :class:`~fathom_tune.engine.Engine`
    (they read its configuration and caches)."""

    @staticmethod
    def _client_steps(hparams: HParams | tuple[HParams, ...], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``K_i`` and ``B_int`` of clients with ``sizes`` examples: under one
        :class:`HParams`, or one each."""
        if isinstance(hparams, HParams):
            e, b = hparams.local_epochs, hparams.batch_int
            # local_steps(e, n, B) for every client, its arithmetic unrolled
            return np.array([max(math.ceil(e * n / b), 1) for n in sizes.tolist()]), np.full(len(sizes), b)
        return np.array([hp.local_steps(n) for hp, n in zip(hparams, sizes.tolist())]), np.array(
            [hp.batch_int for hp in hparams]
        )

    def _block_arrays(self, members, sampled, steps, etas, weights_all, b_int):
        """Per-block inputs padded to ``client_block`` clients (padding clients run no step)."""
        p_block = self.client_block
        bucket = bucket_size(b_int, self.buckets)
        ex_mask = np.zeros(bucket, np.float32)
        ex_mask[:b_int] = 1.0
        eta = np.zeros(p_block, np.float32)
        eta[: len(members)] = etas[members]
        w = np.zeros(p_block, np.float32)
        w[: len(members)] = weights_all[members]
        cidx = np.zeros(p_block, np.int32)
        cidx[: len(members)] = sampled[members]
        n_steps = np.zeros(p_block, np.int32)
        n_steps[: len(members)] = steps[members]
        return bucket, ex_mask, eta, w, cidx, n_steps

    def _host_blocks(self, state, blocks, sampled, steps, b_ints, etas, weights_all, stat0, validate):
        """Each block's batches gathered on the host, one compiled call per chunk of steps."""
        x0 = state.params
        u = self._programs.zeros(x0)
        p_block, s_call = self.client_block, self.steps_per_call
        pending, spare = [], None
        for members in blocks:
            b_int = int(b_ints[members[0]])
            bucket, ex_mask, eta, w, cidx, n_steps = self._block_arrays(
                members, sampled, steps, etas, weights_all, b_int
            )
            inv_b = np.float32(1.0 / b_int)
            n_calls = -(-int(n_steps.max()) // s_call)
            plans = [
                self._batch_plan(int(sampled[m]), state.round, int(steps[m]), b_int, n_calls * s_call, bucket)
                for m in members
            ]
            params = self._programs.broadcast(x0)
            if spare is None:  # each call writes the new models here; later blocks reuse it
                spare = self._programs.broadcast(x0)
            ctx, rate = self._programs.start_rates(state.opt_state) if self.local_rate is not None else ((), ())
            stat_b = np.full(p_block, stat0, np.float32)
            loss_b = np.zeros(p_block, np.float32)
            # What every call of the block reads, on the devices once (not sent per call).
            ex_mask, n_dev, seed, rnd, cidx, eta, inv_b = self._programs.put(
                (ex_mask, n_steps.astype(np.int32), self.seed, state.round, cidx, eta, inv_b)
            )
            if validate:
                val_batch, val_mask = self._validation_block(members, sampled, p_block)
                before_b = self._programs.validation_loss(params, val_batch, val_mask)
            # Batches gathered for several calls at once (up to GATHER_BYTES), each
            # call's a view: one gather per client and feature, not one per call.
            span = max(1, GATHER_BYTES // max(1, p_block * s_call * bucket * self._example_bytes()))
            for call in range(n_calls):
                if call % span == 0:
                    span_steps = slice(call * s_call, (call + span) * s_call)
                    gathered = self._gather(members, sampled, plans, span_steps, p_block)
                at = (call % span) * s_call
                batches = {key: arr[:, at : at + s_call] for key, arr in gathered.items()}
                new, stat_b, loss_b, rate = self._programs.local_steps(
                    x0, ctx, params, spare, stat_b, loss_b, rate, batches, ex_mask, n_dev, seed, rnd, cidx,
                    call * s_call, eta, inv_b,
                )
                params, spare = new, params
            if validate:
                after_b = self._programs.validation_loss(params, val_batch, val_mask)
            else:
                before_b = after_b = loss_b
            report_b = self._programs.report_rates(rate) if self.local_rate is not None else loss_b
            u = self._programs.accumulate(u, x0, params, w)
            pending.append((members, [stat_b, loss_b, before_b, after_b, report_b]))
        new_params, opt_state = self._programs.server_update(x0, state.opt_state, u)
        return new_params, opt_state, u, pending

    def _resident_blocks(self, state, blocks, sampled, steps, b_ints, etas, weights_all, stat0, validate, ahead):
        """Each block in one compiled call on the resident data, the server update
        included (the last block's is the round's). ``ahead``: the round's
        :meth:`_draw_ahead`, or None."""
        data = self._resident
        x0, opt_state = state.params, state.opt_state
        if self._zero_update is None:
            self._zero_update = self._programs.zeros(x0)
        u = self._zero_update
        shuffles = ahead.shuffles if ahead is not None else self._round_shuffles(state.round, sampled)
        ready = ahead.plans if ahead is not None and ahead.blocks is blocks else [None] * len(blocks)
        pending = []
        for members, plan in zip(blocks, ready):
            b_int = int(b_ints[members[0]])
            bucket, _, eta, w, cidx, n_steps = self._block_arrays(members, sampled, steps, etas, weights_all, b_int)
            ints = np.concatenate([n_steps, cidx, [b_int]]).astype(np.int32)
            floats = np.concatenate([eta, w, [1.0 / b_int, stat0]]).astype(np.float32)
            if plan is None or plan.shape[1] != self._plan_rows(bucket, int(n_steps.max())):
                plan = self._block_plan(members, sampled, steps, b_int, shuffles)
            self._rungs[bucket] = plan.shape[1] // self.steps_per_call
            val = self._resident_validation(members, sampled, self.client_block) if validate else None
            # Every call also applies the server update (one optax step, next to
            # nothing); the last block's is the round's.
            new_params, new_opt, u, out = self._programs.block_round(
                x0, opt_state, u, data["train"], plan, ints, floats, self.seed, state.round, val
            )
            pending.append((members, out))
        return new_params, new_opt, u, pending

    def _plan_rows(self, bucket: int, most_steps: int) -> int:
        """Rows of a plan in ``bucket`` (the compiled loop runs only the chunks needed):
        room for the most steps the task's bounds allow in this bucket, so learning
        rate and epochs compile nothing; past that, rounded up to a power of two."""
        n_chunks = -(-most_steps // self.steps_per_call)
        rung = self._rungs.get(bucket) or self._initial_rung(bucket)
        return self.steps_per_call * max(rung, 1 << max(n_chunks - 1, 0).bit_length())

    def _block_plan(self, members, sampled, steps, b_int, shuffles) -> np.ndarray:
        """A block's batches as indices into the resident data, ``[client_block, rows,
        bucket]`` (rows: :meth:`_plan_rows`): client ``j``'s first ``K_j`` rows hold
        its batches of ``b_int`` examples (padding slots point at its first example
        and are masked); the rows of steps it does not run point at example 0 and
        are never applied."""
        bucket = bucket_size(b_int, self.buckets)
        rows = self._plan_rows(bucket, int(steps[members].max()))
        plan = np.zeros((self.client_block, rows, bucket), np.int32)
        offsets = self._resident["offsets"]
        for j, i in enumerate(members):
            c, k = int(sampled[i]), int(steps[i])
            rows_j = plan[j, :k]
            rows_j[:, :b_int] = shuffles[c].take(k * b_int).reshape(k, b_int)
            rows_j += offsets[c]  # the padding slots too: the client's first example
        return plan

    def _initial_rung(self, bucket: int) -> int:
        """Chunks a plan in ``bucket`` holds at first: enough for the largest local
        epochs of ``task.bounds``, the largest client and the smallest batch size in
        the bucket (a power of two; at most 2**20 plan entries, growing past that)."""
        smallest = max([0] + [b for b in self.buckets if b < bucket]) + 1
        epochs = self.task.bounds.upper.local_epochs
        k_max = max(math.ceil(epochs * int(self._client_sizes.max()) / smallest), 1)
        rung = 1 << max(-(-k_max // self.steps_per_call) - 1, 0).bit_length()
        while rung > 1 and self.client_block * self.steps_per_call * rung * bucket > 1 << 20:
            rung //= 2
        return rung

    def _round_shuffles(self, rnd: int, sampled) -> dict[int, Shuffles]:
        """The round's :class:`Shuffles` per client."""
        return {int(c): Shuffles(client_rng(self.seed, rnd, int(c)), int(self._client_sizes[c])) for c in sampled}

    def _draw_ahead(self, rnd: int, hparams) -> None:
        """While the devices compute the current round: samples round ``rnd``'s
        clients, draws their first shuffle and, for ``hparams`` (an
        :class:`~fathom_tune.HParams`, or None for per-client hyperparameters), its
        blocks and batch plans. :meth:`run_round` uses the plans when round ``rnd``
        has the same steps and batch sizes (every round of a static run); they are
        the draws it would make itself, taken off the critical path."""
        sampled = self.sampled(rnd)
        shuffles = self._round_shuffles(rnd, sampled)
        for sh in shuffles.values():
            sh.take(1)
        ahead = _Ahead(rnd, sampled, shuffles)
        if hparams is not None:
            ahead.steps, ahead.b_ints = self._client_steps(hparams, self._client_sizes[sampled])
            ahead.blocks = self._blocks(ahead.steps, ahead.b_ints)
            ahead.plans = [
                self._block_plan(m, sampled, ahead.steps, int(ahead.b_ints[m[0]]), shuffles) for m in ahead.blocks
            ]
        self._ahead = ahead

    def _fits_on_devices(self, per_device: int) -> bool:
        """Whether rounds run on resident client data (see ``resident_bytes``)."""
        if per_device == 1 and jax.default_backend() == "cpu":
            return False  # one client per device: compute-bound, kept out of compiled loops
        n_all = int(self._client_sizes.sum() + self._held_sizes.sum())
        return n_all * self._example_bytes() <= self.resident_bytes

    def _example_bytes(self) -> int:
        """The bytes of one training example, all its features (from the arrays' shapes,
        so a client without examples counts too)."""
        return sum(v.dtype.itemsize * math.prod(v.shape[1:]) for v in self._client_examples(0).values())

    def _resident_data(self) -> dict | None:
        """Every client's training (and validation) examples on the devices, loaded at
        the first round; None where this engine gathers on the host."""
        if not self.resident:
            return None
        if self._resident is not None:
            return self._resident
        parts = [self._client_examples(i) for i in range(len(self._client_ids))]
        offsets = np.concatenate([[0], np.cumsum(self._client_sizes)[:-1]]).astype(np.int32)
        train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        resident = {"offsets": offsets, "train": self._programs.put(train)}
        if self.client_validation > 0.0:
            vparts = [self._client_validation(i) for i in range(len(self._client_ids))]
            resident["val_offsets"] = np.concatenate([[0], np.cumsum(self._held_sizes)[:-1]]).astype(np.int32)
            resident["val"] = self._programs.put({k: np.concatenate([p[k] for p in vparts]) for k in vparts[0]})
        self._resident = resident
        return resident

    def _resident_validation(self, members, sampled, p_block):
        """The block's validation examples as indices into the resident data, and their
        masks, padded to the largest client's part (one shape for every block)."""
        held = self._held_sizes[sampled[members]]
        bucket = bucket_size(max(int(self._held_sizes.max()), 1), self.buckets)
        idx = np.zeros((p_block, bucket), np.int32)
        mask = np.zeros((p_block, bucket), np.float32)
        for j, m in enumerate(members):
            c, n = int(sampled[m]), int(held[j])
            idx[j] = self._resident["val_offsets"][c]
            idx[j, :n] += np.arange(n, dtype=np.int32)
            mask[j, :n] = 1.0
        return self._resident["val"], idx, mask

    def _validation_block(self, members, sampled, p_block):
        """The block's validation parts, padded to one bucket, and their masks."""
        held = [int(self._held_sizes[sampled[m]]) for m in members]
        bucket = bucket_size(max(max(held), 1), self.buckets)
        first = self._client_validation(int(sampled[members[0]]))
        out = {}
        mask = np.zeros((p_block, bucket), np.float32)
        for key, arr in first.items():
            buf = np.zeros((p_block, bucket) + arr.shape[1:], arr.dtype)
            for j, m in enumerate(members):
                part = self._client_validation(int(sampled[m]))[key]
                buf[j, : len(part)] = part
            out[key] = buf
        for j, n in enumerate(held):
            mask[j, :n] = 1.0
        return out, mask

    def _batch_plan(self, client: int, rnd: int, k: int, b_int: int, total_steps: int, bucket: int):
        """Example indices ``[total_steps, bucket]`` of one client: shuffle, repeat.

        The first ``k`` rows hold ``b_int`` real indices each, drawn from
        consecutive passes over a fresh permutation per epoch; padding slots and
        the rows of inactive steps point at example 0 and are masked.
        """
        rng = client_rng(self.seed, rnd, client)
        plan = np.zeros((total_steps, bucket), np.int64)
        plan[:k, :b_int] = batch_indices(int(self._client_sizes[client]), k, b_int, rng)
        return plan

    def _gather(self, members, sampled, plans, sl, p_block):
        """The block's batches of steps ``sl``: ``[p_block, steps, bucket, ...]`` per
        feature; slots past the block's clients repeat its first client."""
        examples = [self._client_examples(int(sampled[m])) for m in members]
        examples += examples[:1] * (p_block - len(members))
        rows = [plans[j][sl] for j in range(len(members))]
        rows += rows[:1] * (p_block - len(members))
        if p_block == 1:  # one client: its batches as they come out of the gather
            return {key: arr[rows[0]][None] for key, arr in examples[0].items()}
        return {key: np.stack([ex[key][r] for ex, r in zip(examples, rows)]) for key in examples[0]}
