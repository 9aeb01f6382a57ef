"""fathom_tune: FATHOM one-shot hyperparameter tuning for federated learning.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106): it adapts the client learning rate, the local epochs and
the local batch size of FedAvg during a single training run.
"""

from fathom_tune import _compat

_compat.apply()  # before anything imports fedjax

from fathom_tune import tasks  # noqa: E402
from fathom_tune._hparams import Bounds  # noqa: E402
from fathom_tune._hparams import HParams  # noqa: E402
from fathom_tune.task import Target  # noqa: E402
from fathom_tune.task import Task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Bounds",
    "HParams",
    "Target",
    "Task",
    "tasks",
    "__version__",
]
