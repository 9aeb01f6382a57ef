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
writes (tests compare the two field by field on every storage kind).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

import optuna
from optuna.distributions import distribution_to_json
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import FrozenTrial

__all__ = ["add_trials", "set_study_attrs"]


def add_trials(study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
    """Adds finished ``trials`` (templates, as for ``study.add_trials``) to ``study``.

    Each trial gets the next trial number in order; ``number`` and
    ``_trial_id`` of the templates are ignored. The templates are the
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
    storage = study._storage
    rdb = _rdb_of(storage)
    if rdb is not None:
        _rdb_insert(rdb, study._study_id, trials)
    elif isinstance(storage, JournalStorage) and hasattr(storage._backend, "append_logs") and not hasattr(
        storage._backend, "save_snapshot"
    ):
        _journal_append(storage, study._study_id, trials)
    else:
        for t in trials:
            storage.create_new_trial(study._study_id, template_trial=_handed(t))


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
    rdb = _rdb_of(study._storage)
    if rdb is None:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        owner = models.StudyModel.find_or_raise_by_id(study._study_id, session)
        for key, value in attrs.items():
            attribute = models.StudyUserAttributeModel.find_by_study_and_key(owner, key, session)
            if attribute is None:
                session.add(models.StudyUserAttributeModel(study_id=owner.study_id, key=key, value_json=json.dumps(value)))
            else:
                attribute.value_json = json.dumps(value)


# ------------------------------------------------------------------------- RDB
def _rdb_of(storage) -> RDBStorage | None:
    if isinstance(storage, RDBStorage):
        return storage
    backend = getattr(storage, "_backend", None)  # Optuna's cache in front of an RDBStorage
    return backend if isinstance(backend, RDBStorage) else None


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    # Optuna's trial table holds naive UTC (see its TrialModel.datetime_start setter).
    return None if moment is None else moment.astimezone(datetime.UTC).replace(tzinfo=None)


def _rdb_insert(storage: RDBStorage, study_id: int, trials: list[FrozenTrial]) -> None:
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        # The study's row lock serialises trial numbering with other writers,
        # as in RDBStorage.create_new_trial.
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        first = (
            session.query(sqlalchemy.func.count(models.TrialModel.trial_id))
            .filter(models.TrialModel.study_id == study_id)
            .scalar()
        )
        connection = session.connection()
        table = models.TrialModel.__table__
        rows = [
            {
                "number": first + i,
                "study_id": study_id,
                "state": t.state,
                "datetime_start": _utc(t.datetime_start),
                "datetime_complete": _utc(t.datetime_complete),
            }
            for i, t in enumerate(trials)
        ]
        if connection.dialect.insert_executemany_returning_sort_by_parameter_order:
            inserted = connection.execute(
                sqlalchemy.insert(table).returning(table.c.trial_id, sort_by_parameter_order=True), rows
            )
            ids = [row[0] for row in inserted]
        else:  # one INSERT per trial, still in the one transaction
            ids = [connection.execute(sqlalchemy.insert(table), row).inserted_primary_key[0] for row in rows]
        params, values, user, system, intermediate = [], [], [], [], []
        for trial_id, t in zip(ids, trials):
            for name, value in t.params.items():
                distribution = t.distributions[name]
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": distribution.to_internal_repr(value),
                        "distribution_json": distribution_to_json(distribution),
                    }
                )
            objectives = t.values if t.values is not None and len(t.values) > 1 else (
                [] if t.value is None else [t.value]
            )
            for objective, value in enumerate(objectives):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
            user += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in t.user_attrs.items()]
            system += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in t.system_attrs.items()]
            for step, value in t.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                intermediate.append(
                    {"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind}
                )
        for model, batch in (
            (models.TrialParamModel, params),
            (models.TrialValueModel, values),
            (models.TrialUserAttributeModel, user),
            (models.TrialSystemAttributeModel, system),
            (models.TrialIntermediateValueModel, intermediate),
        ):
            if batch:
                connection.execute(sqlalchemy.insert(model.__table__), batch)


# --------------------------------------------------------------------- journal
def _iso(moment: datetime.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def _journal_append(storage: JournalStorage, study_id: int, trials: list[FrozenTrial]) -> None:
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id
    logs = []
    for t in trials:
        many = t.values is not None and len(t.values) > 1
        log = {
            "op_code": JournalOperation.CREATE_TRIAL,
            "worker_id": worker,
            "study_id": study_id,
            "datetime_start": _iso(t.datetime_start),
            "state": t.state,
            "value": None if many else t.value,
            "values": t.values if many else None,
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "params": {k: t.distributions[k].to_internal_repr(v) for k, v in t.params.items()},
            "user_attrs": t.user_attrs,
            "system_attrs": t.system_attrs,
            "intermediate_values": t.intermediate_values,
        }
        if t.datetime_complete is not None:
            log["datetime_complete"] = _iso(t.datetime_complete)
        logs.append(log)
    with storage._thread_lock:
        storage._backend.append_logs(logs)
        storage._sync_with_backend()

