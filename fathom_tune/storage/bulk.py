"""Finished trials written to an Optuna storage in one transaction per batch.

A tuner that records one trial per communication round (FATHOM) would spend
most of a fast run in storage calls if every round asked, suggested, set
attributes and told through Optuna's trial API: each call is its own commit.
:func:`add_trials` writes whole finished trials instead, the way
``study.add_trials`` does, but with one transaction for the batch:

* an RDB storage (SQLite, PostgreSQL, MySQL; also behind Optuna's cache):
  one transaction of bulk inserts into Optuna's own tables, the trial numbers
  taken under the study's row lock exactly as ``create_new_trial`` takes them;
* a journal file: one append of the batch's ``CREATE_TRIAL`` operations (one
  lock, one ``fsync``), in the format ``JournalStorage.create_new_trial``
  writes;
* any other storage (in memory, a journal with snapshots, a gRPC proxy): one
  ``create_new_trial`` per trial. The templates are handed over: where the
  storage deep-copies a template (Optuna's in-memory storage does, about
  half a millisecond per FATHOM round on digits), it copies only the
  template's dicts, one level deep.

Read back through any Optuna API, the trials equal those ``study.add_trials``
writes (tests compare the two field by field on every storage kind). The
writes into Optuna's tables and journal are
:mod:`fathom_tune.storage.optuna_internals`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from fathom_tune.storage.optuna_internals import (
    journal_add_trials,
    journal_appends_in_place,
    rdb_add_trials,
    rdb_behind,
    rdb_set_study_user_attrs,
    storage_of,
    study_id_of,
)

__all__ = ["add_trials", "set_study_attrs"]


def add_trials(study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
    """Adds finished ``trials`` (templates, as for ``study.add_trials``) to ``study``.

    Each trial gets the next trial number in order; ``number`` and the
    storage id of the templates are ignored. The templates are the
    storage's from then on: do not change them (or what their attributes hold).

    Raises:
        ValueError: a template that is not finished.
    """
    trials = list(trials)
    for t in trials:
        if not t.state.is_finished():
            raise ValueError(f"add_trials: trial templates must be finished, got state {t.state.name}")
    if not trials:
        return
    storage, study_id = storage_of(study), study_id_of(study)
    rdb = rdb_behind(storage)
    if rdb is not None:
        rdb_add_trials(rdb, study_id, trials)
    elif journal_appends_in_place(storage):
        journal_add_trials(storage, study_id, trials)
    else:
        for t in trials:
            storage.create_new_trial(study_id, template_trial=_handed(t))


class _Handed(FrozenTrial):
    """A template handed over to a storage: its deep copy is a plain :class:`FrozenTrial`
    with the template's dicts and lists copied one level deep (their values shared)."""

    def __deepcopy__(self, memo) -> FrozenTrial:
        out = FrozenTrial.__new__(FrozenTrial)
        out.__dict__.update({k: type(v)(v) if type(v) in (dict, list) else v for k, v in vars(self).items()})
        return out


def _handed(trial: FrozenTrial) -> _Handed:
    out = _Handed.__new__(_Handed)
    out.__dict__.update(vars(trial))
    return out


def set_study_attrs(study: optuna.Study, attrs: dict) -> None:
    """Sets the study's user attrs ``attrs`` (as ``study.set_user_attr`` each), in one
    transaction on an RDB storage."""
    rdb = rdb_behind(storage_of(study))
    if rdb is None:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    rdb_set_study_user_attrs(rdb, study_id_of(study), attrs)
