"""Storage: where every run is recorded, read back and checkpointed.

* :mod:`~fathom_tune.storage.opening`: :func:`open_storage` (SQLite, journal
  files, any RDB URL) and :func:`mask_url`;
* :mod:`~fathom_tune.storage.record`: the record's shared schema (every study
  and trial key) and its writers;
* :mod:`~fathom_tune.storage.reader`: :class:`RunRecord`, :func:`read_run`,
  :func:`load_runs`, the one reader of every tuner's study;
* :mod:`~fathom_tune.storage.bulk`: rounds written in one transaction, through
  :mod:`~fathom_tune.storage.optuna_internals` (the one module that uses Optuna's
  private names, each checked on first use);
* :mod:`~fathom_tune.storage.checkpoint`: a run's model and state on disk,
  crash-safe; :mod:`~fathom_tune.storage.history` their append-only history;
  :mod:`~fathom_tune.storage.durable` what both share.
"""

from fathom_tune.storage.opening import mask_url, open_storage

__all__ = ["mask_url", "open_storage"]
