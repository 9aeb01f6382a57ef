"""Tuning: one tuner interface, the registry, the round loop and the one one-run driver.

* :mod:`~fathom_tune.tuning.tuner`: :class:`Tuner` (``run`` checks the
  arguments once, ``tune`` does the work), :class:`TuningResult` (what every
  tuner returns) and :func:`fedavg` (static FedAvg, untuned);
* :mod:`~fathom_tune.tuning.registry`: tuners by name, entry points included;
* :mod:`~fathom_tune.tuning.loop`: the one round loop every tuner trains with;
* :mod:`~fathom_tune.tuning.driver`: the one-run driver (study, batched
  writes, checkpoint and resume) that FATHOM and the one-run peers run on.
"""

from fathom_tune.tuning import loop
from fathom_tune.tuning.registry import ENTRY_POINT_GROUP, get, names, register
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult, fedavg, result_from_record

__all__ = [
    "ENTRY_POINT_GROUP",
    "Request",
    "Tuner",
    "TuningResult",
    "fedavg",
    "get",
    "loop",
    "names",
    "register",
    "result_from_record",
]
