"""fathom_tune: FATHOM one-shot hyperparameter tuning for federated learning.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106): it adapts the client learning rate, the local epochs and
the local batch size of FedAvg during a single training run.
"""

from fathom_tune import _compat

_compat.apply()  # before anything imports fedjax

__version__ = "0.1.0"

# isort: off
from fathom_tune import engine
from fathom_tune import loop
from fathom_tune import tasks
from fathom_tune._checkpoint import CheckpointError
from fathom_tune._hparams import Bounds
from fathom_tune._hparams import HParams
from fathom_tune._hypergrad import ClientTracker
from fathom_tune._hypergrad import FathomConfig
from fathom_tune._hypergrad import ServerTracker
from fathom_tune._hypergrad import aggregate_round
from fathom_tune._hypergrad import safe_cosine
from fathom_tune._optimize import OptimizeResult
from fathom_tune._optimize import make_study_name
from fathom_tune._optimize import optimize
from fathom_tune._sampler import DIVERGED_ATTR
from fathom_tune._sampler import G_ATTR
from fathom_tune._sampler import H_ATTR
from fathom_tune._sampler import FathomSampler
from fathom_tune._sampler import report_divergence
from fathom_tune._sampler import report_round
from fathom_tune._storage import open_storage
from fathom_tune.engine import Cost
from fathom_tune.engine import Engine
from fathom_tune.loop import fedavg
from fathom_tune.task import Target
from fathom_tune.task import Task
# isort: on

__all__ = [
    "DIVERGED_ATTR",
    "G_ATTR",
    "H_ATTR",
    "Bounds",
    "CheckpointError",
    "ClientTracker",
    "Cost",
    "Engine",
    "FathomConfig",
    "FathomSampler",
    "HParams",
    "OptimizeResult",
    "ServerTracker",
    "Target",
    "Task",
    "__version__",
    "aggregate_round",
    "engine",
    "fedavg",
    "loop",
    "make_study_name",
    "open_storage",
    "optimize",
    "report_divergence",
    "report_round",
    "safe_cosine",
    "tasks",
]
