"""The registry of tuners by name: :func:`register`, :func:`get`, :func:`names`.

``python -m studies.compare --tuners`` accepts every registered name. Registering a
tuner: call :func:`register` in the process, or ship it in a package with an entry
point in the group ``fathom_tune.tuners`` whose object is a tuner, or a mapping or
iterable of tuners (this project's own ``baselines`` registers that way).

Example:
    >>> import fathom_tune
    >>> fathom_tune.tuners.get("fathom").name
    'fathom'
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping

from fathom_tune.tuning.tuner import Tuner

__all__ = ["ENTRY_POINT_GROUP", "get", "names", "register"]

ENTRY_POINT_GROUP = "fathom_tune.tuners"
"""The entry-point group through which installed packages register tuners."""

_log = logging.getLogger(__name__)

_REGISTERED: dict[str, Tuner] = {}
_ENTRY_POINTS_LOADED = False


def register(tuner: Tuner, *, replace: bool = False) -> Tuner:
    """Adds ``tuner`` to the registry under ``tuner.name``; returns it.

    Raises:
        TypeError: ``tuner`` does not implement :class:`Tuner`.
        ValueError: the name is empty or holds ``/``, or is taken (unless
            ``replace``).
    """
    if not isinstance(tuner, Tuner):
        raise TypeError(f"tuner must be a fathom_tune.tuners.Tuner, got {tuner!r}")
    name = tuner.name
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"tuner.name must be a non-empty str without '/', got {name!r}")
    if name in _REGISTERED and not replace and _REGISTERED[name] is not tuner:
        raise ValueError(f"a tuner named {name!r} is already registered; pass replace=True")
    _REGISTERED[name] = tuner
    return tuner


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the others
            _log.warning("tuner entry point %r could not be loaded: %s", ep.value, exc)
            continue
        if isinstance(found, Tuner):
            found = [found]
        elif isinstance(found, Mapping):
            found = list(found.values())
        for tuner in found:
            if tuner.name not in _REGISTERED:
                register(tuner)


def names() -> list[str]:
    """Every registered tuner's name: FATHOM first, then by name."""
    _load_entry_points()
    return sorted(_REGISTERED, key=lambda n: (n != "fathom", n))


def get(name: str) -> Tuner:
    """The tuner registered as ``name``.

    Raises:
        ValueError: unknown ``name``; the message lists the valid names.
    """
    _load_entry_points()
    if not isinstance(name, str) or name not in _REGISTERED:
        raise ValueError(f"unknown tuner {name!r}; valid tuners: {', '.join(names())}")
    return _REGISTERED[name]
