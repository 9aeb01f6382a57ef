"""FATHOM in one place: its math, its state, its sampler, its run, its tuner.

FATHOM ("Federated Hypergradient Descent", A. K. Kan, arXiv 2211.02106)
tunes FedAvg's client learning rate, local epochs and batch size during one
training run:

* :mod:`~fathom_tune.fathom.hypergrad`: the client statistic ``phi`` (an
  engine hook, :class:`LocalAgreement`, that static runs leave off), ``G``,
  ``H`` and the server's moving average ``m`` with its ``alpha``
  (:class:`ServerTracker`, or :func:`track_agreement` to have an engine's
  server optimizer compute them inside the round);
* :mod:`~fathom_tune.fathom.state`: ``p = log(hyperparameters)``, the one
  hyper step (``next_hparams``, :func:`egn_step` in log space) and
  :class:`FathomConfig`;
* :mod:`~fathom_tune.fathom.sampler`: :class:`FathomSampler`, an Optuna
  sampler with one trial per round, for any federated loop, and FATHOM's
  record keys (``FATHOM_G``, ``FATHOM_H``, ``FATHOM_DIVERGED``, ``FATHOM_REJECTED``);
* :mod:`~fathom_tune.fathom.optimize`: :func:`optimize`, one run on the
  project's engine and the one one-run driver (:mod:`fathom_tune.tuning.one_run`),
  whose schedule is ``fathom_tune.fathom.schedule.FathomSchedule``;
* :mod:`~fathom_tune.fathom.tuner`: :class:`Fathom`, the registered tuner.
"""

# isort: off
from fathom_tune.fathom.hypergrad import ClientTracker
from fathom_tune.fathom.hypergrad import LocalAgreement
from fathom_tune.fathom.hypergrad import ServerTracker
from fathom_tune.fathom.hypergrad import aggregate_round
from fathom_tune.fathom.hypergrad import local_hypergradient
from fathom_tune.fathom.hypergrad import safe_cosine
from fathom_tune.fathom.hypergrad import track_agreement
from fathom_tune.fathom.state import FathomConfig
from fathom_tune.fathom.state import egn_step
from fathom_tune.fathom.sampler import DIVERGED_LR_FACTOR
from fathom_tune.fathom.sampler import FathomSampler
from fathom_tune.fathom.sampler import report_divergence
from fathom_tune.fathom.sampler import report_round
from fathom_tune.fathom.optimize import optimize
from fathom_tune.fathom.tuner import Fathom
from fathom_tune.fathom.auto import AutoConfig
from fathom_tune.fathom.auto import FathomAuto
# isort: on

from fathom_tune.tuning import registry as _tuners

_tuners.register(Fathom())
_tuners.register(FathomAuto())

__all__ = [
    "DIVERGED_LR_FACTOR",
    "AutoConfig",
    "ClientTracker",
    "Fathom",
    "FathomAuto",
    "FathomConfig",
    "FathomSampler",
    "LocalAgreement",
    "ServerTracker",
    "aggregate_round",
    "egn_step",
    "local_hypergradient",
    "optimize",
    "report_divergence",
    "report_round",
    "safe_cosine",
    "track_agreement",
]
