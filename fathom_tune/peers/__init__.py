"""FATHOM's one-run peers: tuners that, like FATHOM, tune while they train, in one run.

* :class:`FedEx` (Khodak et al., NeurIPS 2021, arXiv 2106.04502): every
  sampled client trains with its own (eta, E, B) drawn from a distribution
  that the server moves by exponentiated gradient on the clients' validation
  losses (:mod:`~fathom_tune.peers.fedex`);
* :class:`FedHyper` (Wang, Wang, Li, ICLR 2024, arXiv 2310.03156): learning
  rates from inner products of successive global updates, on the server
  (G, GM), set by the server for the clients (SL), adapted by each client
  step by step (CL), or GM and CL together (FULL)
  (:mod:`~fathom_tune.peers.fedhyper`);
* ``fathom+server``: FATHOM for the clients' (eta, E, B) with FedHyper-GM's
  server learning rate (:func:`fedhyper_server` as the engine's server
  optimizer; :data:`~fathom_tune.peers.fedhyper.FATHOM_SERVER`).

Each module holds its method's math, schedule, tuner and record keys. All run
on the one engine and the one one-run driver (:mod:`fathom_tune.tuning.one_run`:
:class:`OneRunSchedule`, :class:`OneRunTuner`, :func:`run_peer`), and record
one trial per round through :mod:`fathom_tune.record`. Registered names: ``fedex``, ``fedex-auto``,
``fedhyper`` (= GM), ``fedhyper-g``, ``fedhyper-gm``, ``fedhyper-sl``,
``fedhyper-cl``, ``fedhyper-full``, ``fathom+server``.
"""

# isort: off
from fathom_tune.peers.fedex import FedEx
from fathom_tune.peers.fedex import arm_gradient
from fathom_tune.peers.fedex import discounted_sums
from fathom_tune.peers.fedex import exponentiated_step
from fathom_tune.peers.fedex import fedex_candidates
from fathom_tune.peers.fedhyper import FEDHYPER_VARIANTS
from fathom_tune.peers.fedhyper import ClientRate
from fathom_tune.peers.fedhyper import FedHyper
from fathom_tune.peers.fedhyper import FedHyperServerState
from fathom_tune.peers.fedhyper import fedhyper_server
from fathom_tune.peers.fedhyper import keep_update
from fathom_tune.peers.fedhyper import sl_step
from fathom_tune.tuning.one_run import OneRunSchedule
from fathom_tune.tuning.one_run import OneRunTuner
from fathom_tune.tuning.one_run import run_schedule as run_peer
# isort: on

from fathom_tune.peers.fedhyper import FATHOM_SERVER as _FATHOM_SERVER
from fathom_tune.tuning import registry as _tuners

PeerSchedule = OneRunSchedule
"""The schedule of a one-run peer: :class:`fathom_tune.tuning.one_run.OneRunSchedule`."""

for _tuner in (
    FedEx("fedex"),
    FedEx("fedex-auto", schedule="auto"),
    FedHyper("fedhyper", "gm"),
    FedHyper("fedhyper-g", "g"),
    FedHyper("fedhyper-gm", "gm"),
    FedHyper("fedhyper-sl", "sl"),
    FedHyper("fedhyper-cl", "cl"),
    FedHyper("fedhyper-full", "full"),
    _FATHOM_SERVER,
):
    _tuners.register(_tuner)

__all__ = [
    "FEDHYPER_VARIANTS",
    "ClientRate",
    "FedEx",
    "FedHyper",
    "FedHyperServerState",
    "OneRunSchedule",
    "OneRunTuner",
    "PeerSchedule",
    "arm_gradient",
    "discounted_sums",
    "exponentiated_step",
    "fedex_candidates",
    "fedhyper_server",
    "keep_update",
    "run_peer",
    "sl_step",
]
