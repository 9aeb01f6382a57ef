"""The engine: FedAvg rounds on a task, with hyperparameters that may change every round.

* :mod:`~fathom_tune.engine.simulator`: :class:`Engine` (``init``,
  ``run_round``, ``evaluate``; the round it runs is described there);
* :mod:`~fathom_tune.engine.settings`: :class:`EngineSettings`, what a checkpoint
  of a run must match;
* :mod:`~fathom_tune.engine.batching`: the batch-size ladders, client sampling,
  the clients' shuffles and batch plans;
* :mod:`~fathom_tune.engine.results`: the ledger (:class:`Cost`), the server
  state and a round's result;
* :mod:`~fathom_tune.engine.hooks`: the public hooks :class:`ClientStatistic`
  and :class:`LocalRate`;
* :mod:`~fathom_tune.engine.programs`: the compiled programs;
  :mod:`~fathom_tune.engine.round_paths`: the two ways a round runs (client
  data resident on the devices, or batches gathered on the host);
  :mod:`~fathom_tune.engine.xla_options`, :mod:`~fathom_tune.engine.timing`.
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
