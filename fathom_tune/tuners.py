"""Tuners, as users import them: the interface of :mod:`fathom_tune.tuning.tuner` and the
registry of :mod:`fathom_tune.tuning.registry` under one name.

Example:
    >>> import fathom_tune
    >>> fathom_tune.tuners.get("fathom").name
    'fathom'
"""

from fathom_tune.tuning.registry import ENTRY_POINT_GROUP, get, names, register
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult, fedavg, result_from_record

__all__ = [
    "ENTRY_POINT_GROUP",
    "Request",
    "Tuner",
    "TuningResult",
    "fedavg",
    "get",
    "names",
    "register",
    "result_from_record",
]
