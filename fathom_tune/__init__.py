"""fathom_tune: FATHOM one-shot hyperparameter tuning for federated learning.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106): it adapts the client learning rate, the local epochs and
the local batch size of FedAvg during a single training run.
"""

from fathom_tune import _compat

_compat.apply()  # before anything imports fedjax

__version__ = "0.1.0"

from fathom_tune import engine  # noqa: E402
from fathom_tune import loop  # noqa: E402
from fathom_tune import tasks  # noqa: E402
from fathom_tune._hparams import Bounds  # noqa: E402
from fathom_tune._hparams import HParams  # noqa: E402
from fathom_tune._hypergrad import ClientTracker  # noqa: E402
from fathom_tune._hypergrad import FathomConfig  # noqa: E402
from fathom_tune._hypergrad import ServerTracker  # noqa: E402
from fathom_tune._hypergrad import aggregate_round  # noqa: E402
from fathom_tune._hypergrad import safe_cosine  # noqa: E402
from fathom_tune._optimize import OptimizeResult  # noqa: E402
from fathom_tune._optimize import make_study_name  # noqa: E402
from fathom_tune._optimize import optimize  # noqa: E402
from fathom_tune._sampler import DIVERGED_ATTR  # noqa: E402
from fathom_tune._sampler import G_ATTR  # noqa: E402
from fathom_tune._sampler import H_ATTR  # noqa: E402
from fathom_tune._sampler import FathomSampler  # noqa: E402
from fathom_tune._sampler import report_divergence  # noqa: E402
from fathom_tune._sampler import report_round  # noqa: E402
from fathom_tune._storage import open_storage  # noqa: E402
from fathom_tune.engine import Cost  # noqa: E402
from fathom_tune.engine import Engine  # noqa: E402
from fathom_tune.loop import fedavg  # noqa: E402
from fathom_tune.task import Target  # noqa: E402
from fathom_tune.task import Task  # noqa: E402

__all__ = [
    "DIVERGED_ATTR",
    "G_ATTR",
    "H_ATTR",
    "Bounds",
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
