"""The engine: FedAvg rounds on a task, with hyperparameters that may change every round.

* :mod:`~fathom_tune.engine.simulator`: :class:`Engine` (``init``,
  ``run_round``, ``evaluate``; the round it runs is described there);
* :mod:`~fathom_tune.engine.settings`: :class:`EngineSettings`, what a checkpoint
  of a run must match, and the checks of the engine's arguments;
* :mod:`~fathom_tune.engine.layout`: the client block, round path, steps per
  call and bucket ladder an engine chooses;
* :mod:`~fathom_tune.engine.data`: the clients' examples, their held-out
  validation parts and the pooled evaluation batches;
* :mod:`~fathom_tune.engine.batching`: the batch-size ladders, client sampling,
  the clients' shuffles and the one batch plan builder;
* :mod:`~fathom_tune.engine.blocks`: a round's draws and blocks of clients, and
  what a round path is given;
* :mod:`~fathom_tune.engine.resident` and :mod:`~fathom_tune.engine.host`: the
  two round paths (client data resident on the devices, or batches gathered
  on the host);
* :mod:`~fathom_tune.engine.program_spec`, :mod:`~fathom_tune.engine.client_steps`
  and :mod:`~fathom_tune.engine.programs`: what the compiled programs are made
  for, the traced local steps, and the jitted programs shared per spec;
* :mod:`~fathom_tune.engine.results`: the ledger (:class:`Cost`), the server
  state and a round's result;
* :mod:`~fathom_tune.engine.hooks`: the public hooks :class:`ClientStatistic`
  and :class:`LocalRate`;
* :mod:`~fathom_tune.engine.xla_options`, :mod:`~fathom_tune.engine.timing`: the
  XLA options of the programs, and the seconds spent compiling.
"""

from fathom_tune.engine.batching import (
    batch_indices,
    bucket_size,
    client_rng,
    default_buckets,
    fine_buckets,
    sample_clients,
)
from fathom_tune.engine.hooks import ClientStatistic, LocalRate
from fathom_tune.engine.programs import LARGE_MODEL_EQNS, describe_optimizer
from fathom_tune.engine.results import Cost, RoundResult, ServerState
from fathom_tune.engine.settings import EngineSettings
from fathom_tune.engine.simulator import FEDAVG_SERVER, Engine

__all__ = [
    "FEDAVG_SERVER",
    "LARGE_MODEL_EQNS",
    "ClientStatistic",
    "Cost",
    "Engine",
    "EngineSettings",
    "LocalRate",
    "RoundResult",
    "ServerState",
    "batch_indices",
    "bucket_size",
    "client_rng",
    "default_buckets",
    "describe_optimizer",
    "fine_buckets",
    "sample_clients",
]
