"""What the engine's compiled programs are made for: :class:`ProgramSpec`, a hashable value.

Engines whose specs are equal (same model, server optimizer, ``client_block``,
``steps_per_call``, client statistic, local rate and devices) share one set of
compiled programs (:func:`fathom_tune.engine.programs.programs`). The spec
also says how a block's clients are laid out over the devices: with more than
one device, a one-axis mesh (``"clients"``) over which
:func:`jax.shard_map` splits them, everything else replicated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

__all__ = ["CLIENTS", "REPLICATED", "ProgramSpec"]

CLIENTS, REPLICATED = P("clients"), P()
"""The partition specs of a value split over the block's clients, and of a replicated one."""


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One configuration of the compiled programs.

    Attributes:
        model: the ``fedjax.Model``.
        server_optimizer: the optax transformation applied to the mean update.
        client_block: clients trained together (a multiple of the devices).
        steps_per_call: local steps unrolled into one compiled chunk.
        statistic: the :class:`~fathom_tune.engine.ClientStatistic`, or None.
        local_rate: the :class:`~fathom_tune.engine.LocalRate`, or None.
        devices: the devices a block's clients are split over.
        compiles: programs traced so far under this spec, by kind (a tally,
            not part of the spec's identity: read by ``Engine.compile_counts``).
    """

    model: object
    server_optimizer: optax.GradientTransformation
    client_block: int
    steps_per_call: int
    statistic: object
    local_rate: object
    devices: tuple
    compiles: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.client_block % len(self.devices):
            raise ValueError(
                f"client_block {self.client_block} is not a multiple of the {len(self.devices)} devices"
            )

    @property
    def per_device(self) -> int:
        """Clients each device trains."""
        return self.client_block // len(self.devices)

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh | None:
        """The mesh over the ``"clients"`` axis; None on one device."""
        if len(self.devices) == 1:
            return None
        return jax.sharding.Mesh(np.array(self.devices), ("clients",))

    @functools.cached_property
    def replicated(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.sharding.NamedSharding(self.mesh, REPLICATED)

    @functools.cached_property
    def per_client(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return self.replicated
        return jax.sharding.NamedSharding(self.mesh, CLIENTS)

    def count(self, kind: str) -> None:
        """Tallies one traced program of ``kind`` (called while JAX traces it, i.e.
        once per compiled program)."""
        self.compiles[kind] = self.compiles.get(kind, 0) + 1

    def sharded(self, f, in_specs, out_specs):
        """``f`` on each device's share of the clients (``f`` itself on one device)."""
        if self.mesh is None:
            return f
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def total(self, u):
        """The update summed over the devices' shares."""
        return u if self.mesh is None else jax.lax.psum(u, "clients")
