"""fathom_tune: FATHOM one-shot hyperparameter tuning for federated learning.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106): it adapts the client learning rate, the local epochs and
the local batch size of FedAvg during a single training run.

The data flow (docs/ARCHITECTURE.md): a :class:`Task` feeds the
:class:`Engine`; a tuner (:mod:`fathom_tune.tuners`: FATHOM here, the search
baselines in ``baselines``) picks each round's or each run's
hyperparameters and records its run through :mod:`fathom_tune.record` in an
Optuna storage (:mod:`fathom_tune.storage`); reports read every tuner's run
back through the same module. The library logs to the ``fathom_tune``
logger and prints nothing; pass ``progress=True`` for progress bars.
"""

import logging

from fathom_tune import _compat

_compat.apply()  # before anything imports fedjax

from fathom_tune._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# isort: off
from fathom_tune import checks
from fathom_tune import engine
from fathom_tune import loop
from fathom_tune import record
from fathom_tune import tasks
from fathom_tune import tuners
from fathom_tune import fathom
from fathom_tune import peers
from fathom_tune import storage
from fathom_tune import tuning
from fathom_tune.storage.checkpoint import CheckpointError
from fathom_tune.engine import Cost
from fathom_tune.engine import Engine
from fathom_tune.fathom import ClientTracker
from fathom_tune.fathom import FathomConfig
from fathom_tune.fathom import FathomSampler
from fathom_tune.fathom import ServerTracker
from fathom_tune.fathom import aggregate_round
from fathom_tune.fathom import optimize
from fathom_tune.fathom import report_divergence
from fathom_tune.fathom import report_round
from fathom_tune.fathom import safe_cosine
from fathom_tune.hparams import Bounds
from fathom_tune.hparams import ClientHParams
from fathom_tune.hparams import HParams
from fathom_tune.storage.record import study_name
from fathom_tune.storage import open_storage
from fathom_tune.task import Target
from fathom_tune.task import Task
from fathom_tune.tuning.safety import SafetyNet
from fathom_tune.tuning.tuner import Tuner
from fathom_tune.tuning.tuner import TuningResult
from fathom_tune.tuning.tuner import fedavg
# isort: on

__all__ = [
    "Bounds",
    "CheckpointError",
    "ClientHParams",
    "ClientTracker",
    "Cost",
    "Engine",
    "FathomConfig",
    "FathomSampler",
    "HParams",
    "SafetyNet",
    "ServerTracker",
    "Target",
    "Task",
    "Tuner",
    "TuningResult",
    "__version__",
    "aggregate_round",
    "checks",
    "engine",
    "fathom",
    "fedavg",
    "loop",
    "open_storage",
    "optimize",
    "peers",
    "record",
    "report_divergence",
    "report_round",
    "safe_cosine",
    "storage",
    "study_name",
    "tasks",
    "tuners",
    "tuning",
]
