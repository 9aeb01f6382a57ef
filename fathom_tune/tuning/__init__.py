"""Tuning: one tuner interface, the registry, the round loop and the one one-run driver.

* :mod:`~fathom_tune.tuning.tuner`: :class:`Tuner` (``run`` checks the
  arguments once, ``tune`` does the work), :class:`TuningResult` (what every
  tuner returns) and :func:`fedavg` (static FedAvg, untuned);
* :mod:`~fathom_tune.tuning.registry`: tuners by name, entry points included;
* :mod:`~fathom_tune.tuning.loop`: the one round loop every tuner trains with;
* :mod:`~fathom_tune.tuning.one_run`: the one one-run driver that FATHOM,
  fathom+server, FedEx and FedHyper run on (:class:`~fathom_tune.tuning.one_run.OneRunSchedule`,
  :class:`~fathom_tune.tuning.one_run.OneRun`,
  :class:`~fathom_tune.tuning.one_run.OneRunTuner`), over
  :mod:`~fathom_tune.tuning.driver`: the study, its resume and the batched writes,
  and :mod:`~fathom_tune.tuning.rounds`: each round judged, learnt and queued as a trial;
* :mod:`~fathom_tune.tuning.safety`: the one-run driver's safety net
  (:class:`SafetyNet`, on by default): a round that blows up is rejected, its
  model dropped, and the tuner backs off.
"""

from fathom_tune.tuning import loop
from fathom_tune.tuning.registry import ENTRY_POINT_GROUP, get, names, register
from fathom_tune.tuning.safety import Rejection, SafetyNet
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult, fedavg, result_from_record

__all__ = [
    "ENTRY_POINT_GROUP",
    "Rejection",
    "Request",
    "SafetyNet",
    "Tuner",
    "TuningResult",
    "fedavg",
    "get",
    "loop",
    "names",
    "register",
    "result_from_record",
]
