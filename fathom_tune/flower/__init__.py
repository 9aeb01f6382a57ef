"""FATHOM in a Flower deployment: a strategy for the ServerApp, a helper for every ClientApp.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
tunes FedAvg's client learning rate, local epochs and batch size during one
run, with nothing sent beyond FedAvg's messages and one scalar per client.
This subpackage runs it on Flower's Message API (``flwr>=1.42``; install
with ``pip install "fathom-tune[flower]"``):

* server: :class:`FathomFedAvg`, Flower's ``FedAvg`` whose ``(eta, E, B)``
  come from :class:`~fathom_tune.FathomSampler` each round and whose rounds
  are trials of an Optuna study (:mod:`~fathom_tune.flower.strategy`);
* clients: :class:`LocalSGD` runs ``K_i = max(ceil(E n_i / B_int), 1)``
  steps of exactly ``B_int`` examples and reports ``phi_i``;
  :func:`train_reply` builds the reply (:mod:`~fathom_tune.flower.client`);
* the message keys, model converters and reply checks:
  :mod:`~fathom_tune.flower.protocol`; the server's round arithmetic
  (node sampling, ``u``, ``G``, cost): :mod:`~fathom_tune.flower.server`;
  checkpoint and resume: :mod:`~fathom_tune.flower.resume`;
* a round as data, for audits: :class:`RoundReport`.

``examples/flower`` is a runnable Flower app (``flwr run``) on the digits
task with a JAX client.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fathom_tune.flower needs Flower (flwr>=1.42,<2, the flower extra); install it with "
        'pip install "fathom-tune[flower]"',
        name="flwr",  # what is missing: importers that skip without Flower look for it
    ) from exc

# isort: off
from fathom_tune.flower import protocol
from fathom_tune.flower.client import LocalResult
from fathom_tune.flower.client import LocalSGD
from fathom_tune.flower.client import batch_plan
from fathom_tune.flower.client import client_generator
from fathom_tune.flower.client import client_key
from fathom_tune.flower.client import fedjax_grad_fn
from fathom_tune.flower.client import train_reply
from fathom_tune.flower.protocol import from_array_record
from fathom_tune.flower.protocol import read_train_config
from fathom_tune.flower.protocol import to_array_record
from fathom_tune.flower.rounds import RoundReport
from fathom_tune.flower.strategy import TUNER
from fathom_tune.flower.strategy import FathomFedAvg
# isort: on

__all__ = [
    "TUNER",
    "FathomFedAvg",
    "LocalResult",
    "LocalSGD",
    "RoundReport",
    "batch_plan",
    "client_generator",
    "client_key",
    "fedjax_grad_fn",
    "from_array_record",
    "protocol",
    "read_train_config",
    "to_array_record",
    "train_reply",
]
