"""How the engine lays its rounds out: the client block, the round path (client data
resident on the devices or batches gathered on the host), the steps per compiled
call and the batch-size ladder, as :class:`~fathom_tune.engine.Engine` documents
their automatic choices."""

from __future__ import annotations

import dataclasses

import jax

from fathom_tune import checks
from fathom_tune.engine.batching import default_buckets, fine_buckets
from fathom_tune.engine.data import ClientData
from fathom_tune.engine.programs import cpu_kind
from fathom_tune.engine.resident import ResidentPath
from fathom_tune.engine.settings import _checked_buckets

__all__ = ["Layout"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """An engine's layout (the arguments of :class:`~fathom_tune.engine.Engine` of the same
    names, with their automatic values filled in; ``resident``: which round path)."""

    client_block: int
    resident_bytes: int
    resident: bool
    steps_per_call: int
    buckets: tuple[int, ...]

    @classmethod
    def choose(
        cls, model, data: ClientData, devices: tuple, clients_per_round: int, widest: int,
        client_block, resident_bytes, steps_per_call, buckets,
    ) -> Layout:
        """The layout for ``model`` on ``data`` over ``devices``, checking the arguments;
        ``widest``: the largest batch size the task's bounds allow."""
        n_dev = len(devices)
        on_cpu = jax.default_backend() == "cpu"
        kind = cpu_kind(model, data.examples(0)) if on_cpu else None
        whole_round = -(-clients_per_round // n_dev) * n_dev
        if client_block is None:
            client_block = n_dev if kind is not None else whole_round
        block = checks.positive_int("client_block", client_block)
        if block % n_dev:
            raise ValueError(
                f"client_block must be a multiple of the {n_dev} devices the clients are split over, "
                f"got {block}; pass devices=1 to train on one device"
            )
        block = min(block, whole_round)
        per_device = block // n_dev
        resident_bytes = checks.positive_int("resident_bytes", resident_bytes)
        # One client per device on XLA:CPU: compute-bound, kept out of compiled loops.
        resident = not (per_device == 1 and on_cpu) and ResidentPath.fits(
            data.sizes, data.held, data.example_bytes, resident_bytes
        )
        if steps_per_call is None:
            # One client per device: compute-bound, no step wasted. Resident: the
            # compiled loop runs only the chunks needed, 1 step each measured no
            # slower than 2-8 on digits. Gathered on the host: 4 per call.
            steps_per_call = 1 if per_device == 1 or resident else 4
        steps_per_call = checks.positive_int("steps_per_call", steps_per_call)
        if buckets is None:
            # Close buckets where a step is compute-bound and compiles fast (convolutions);
            # the LSTM's programs compile for tens of seconds each, so it keeps the
            # coarse ladder.
            buckets = fine_buckets() if kind == "conv" and per_device == 1 else default_buckets()
        return cls(block, resident_bytes, resident, steps_per_call, _checked_buckets(buckets, widest))
