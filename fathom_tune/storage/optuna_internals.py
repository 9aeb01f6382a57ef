"""Every private Optuna name fathom_tune relies on, each behind one small function.

Optuna's public API writes one trial, one attribute or one heartbeat per
call and hides the ids a storage is keyed by. Where that costs a commit per
round (FATHOM records one trial per communication round) or leaves no
public way at all (continuing an interrupted trial in place, a heartbeat
around an ask-and-tell trial), the project uses Optuna's internals, and
only through the functions here. Each names the public call it stands in
for and why that call is not used.

An Optuna release that moves, renames or reshapes one of them makes the
function raise :class:`OptunaInternalsError` at its first use, naming the
internal and the installed Optuna version, rather than writing something
else; ``tests/storage/test_optuna_internals.py`` uses every one of them
on every storage kind against the installed Optuna and compares what they
return with the public calls. The versions supported are :data:`SUPPORTED`
(the bound in ``pyproject.toml``).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import json
from collections.abc import Sequence

import optuna
from optuna.distributions import distribution_to_json
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.trial import FrozenTrial

__all__ = [
    "SUPPORTED",
    "OptunaInternalsError",
    "journal_add_trials",
    "journal_appends_in_place",
    "rdb_add_trials",
    "rdb_behind",
    "rdb_set_study_user_attrs",
    "resume_trial",
    "retries_stale_trials",
    "set_trial_system_attr",
    "set_trial_user_attr",
    "storage_of",
    "study_id_of",
    "trial_heartbeat",
    "trial_id_of",
    "trial_system_attrs",
]

SUPPORTED = ">=4.9,<6"
"""The Optuna versions whose internals this module is written against (``pyproject.toml``)."""


class OptunaInternalsError(RuntimeError):
    """An Optuna internal that fathom_tune relies on is missing or has another shape."""


def _broken(internal: str, what: str) -> OptunaInternalsError:
    return OptunaInternalsError(
        f"fathom_tune relies on the Optuna internal {internal}, which {what} in the installed "
        f"Optuna {optuna.__version__}; fathom_tune supports optuna{SUPPORTED}. Install a "
        "supported Optuna, or adapt fathom_tune/storage/optuna_internals.py to this one."
    )


def _attr(obj, name: str, internal: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _broken(internal, "is missing") from None


def _from(module: str, name: str) -> object:
    internal = f"{module}.{name}"
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        raise _broken(internal, f"is missing (no module {module})") from None
    return _attr(loaded, name, internal)


def _takes(func, params: Sequence[str], internal: str):
    """``func``, after checking that its first parameters are named ``params``."""
    try:
        got = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        raise _broken(internal, "has no signature to check") from None
    if got[: len(params)] != list(params):
        raise _broken(internal, f"takes ({', '.join(got)}), not ({', '.join(params)}, ...)")
    return func


# ------------------------------------------------------------------ studies and trials
def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage behind ``study`` (``study._storage``).

    No public call returns it (``optuna.Trial.storage`` needs a trial); it is
    needed for storage calls keyed by trial id and to tell storage kinds apart.
    """
    return _attr(study, "_storage", "optuna.Study._storage")


def study_id_of(study: optuna.Study) -> int:
    """The storage's id of ``study`` (``study._study_id``).

    Replaces ``storage.get_study_id_from_name(study.study_name)``: a storage
    read (an SQL query on an RDB) on every call, and FATHOM's sampler asks
    every round.
    """
    return _attr(study, "_study_id", "optuna.Study._study_id")


def trial_id_of(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of ``trial`` (``trial._trial_id``, on a live or a frozen trial).

    Replaces ``storage.get_trial_id_from_study_id_trial_number(study_id,
    trial.number)``: a storage read on every call.
    """
    return _attr(trial, "_trial_id", f"optuna.{type(trial).__name__}._trial_id")


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value) -> None:
    """Sets a user attr of the running ``trial``, given as a :class:`FrozenTrial`.

    Replaces ``optuna.Trial(study, trial_id).set_user_attr(key, value)``:
    building a live trial reads the trial again and runs the sampler's
    ``before_trial`` hook, which a trial being failed must not do.
    """
    storage_of(study).set_trial_user_attr(trial_id_of(trial), key, value)


def set_trial_system_attr(study: optuna.Study, trial: FrozenTrial, key: str, value) -> None:
    """Sets a system attr of the running ``trial``.

    Replaces ``Trial.set_system_attr``, removed from Optuna's public API
    (deprecated in 3.1); samplers are passed a :class:`FrozenTrial` anyway.
    """
    storage_of(study).set_trial_system_attr(trial_id_of(trial), key, value)


def trial_system_attrs(trial: optuna.Trial) -> dict:
    """The system attrs of the live ``trial``, read from its storage now.

    Replaces ``Trial.system_attrs`` (deprecated in Optuna 3.1, then removed);
    ``study.get_trials()`` would read every trial of the study for one.
    """
    return storage_of(trial.study).get_trial_system_attrs(trial_id_of(trial))


def resume_trial(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A live :class:`optuna.Trial` for the RUNNING ``trial``, to continue it in place.

    No public call does it: ``study.ask()`` creates a new trial or takes a
    WAITING one; a trial an interrupt left RUNNING keeps its number,
    parameters and intermediate values only if continued through its id.
    """
    cls = _takes(optuna.Trial, ("study", "trial_id"), "optuna.Trial(study, trial_id)")
    return cls(study, trial_id_of(trial))


def trial_heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """The storage's heartbeat thread for ``trial`` (a no-op without a heartbeat).

    ``study.optimize`` runs it around each trial, but a baseline runs its
    trials by ask and tell (its budget decides before each trial), and no
    public call starts the heartbeat for such a trial.
    """
    internal = "optuna.storages._heartbeat.get_heartbeat_thread"
    start = _takes(_from(*internal.rsplit(".", 1)), ("trial_id", "storage"), internal)
    return start(trial_id_of(trial), storage_of(study))


def retries_stale_trials(study: optuna.Study) -> bool:
    """Whether ``study``'s storage fails stale trials (a heartbeat) and retries them.

    No public call tells: ``optuna.storages.fail_stale_trials`` just does
    nothing without a heartbeat.
    """
    base = _from("optuna.storages._heartbeat", "BaseHeartbeat")
    storage = storage_of(study)
    return (
        isinstance(storage, base)
        and storage.get_heartbeat_interval() is not None
        and storage.get_heartbeat_stale_trial_callback() is not None
    )


# ------------------------------------------------------------------ RDB storages
def rdb_behind(storage: BaseStorage) -> RDBStorage | None:
    """The :class:`RDBStorage` of ``storage``: itself, or the one behind Optuna's cache
    (``_CachedStorage._backend``, which ``optuna.create_study(storage=url)`` builds); None
    for another kind. No public call unwraps the cache."""
    if isinstance(storage, RDBStorage):
        return storage
    cached = _from("optuna.storages._cached_storage", "_CachedStorage")
    if not isinstance(storage, cached):
        return None
    backend = _attr(storage, "_backend", "optuna.storages._cached_storage._CachedStorage._backend")
    return backend if isinstance(backend, RDBStorage) else None


_COLUMNS = {
    "StudyModel": {"study_id"},
    "StudyUserAttributeModel": {"study_id", "key", "value_json"},
    "TrialModel": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
    "TrialParamModel": {"trial_id", "param_name", "param_value", "distribution_json"},
    "TrialValueModel": {"trial_id", "objective", "value", "value_type"},
    "TrialUserAttributeModel": {"trial_id", "key", "value_json"},
    "TrialSystemAttributeModel": {"trial_id", "key", "value_json"},
    "TrialIntermediateValueModel": {"trial_id", "step", "intermediate_value", "intermediate_value_type"},
}
"""The tables of ``optuna.storages._rdb.models`` written here and the columns written."""

_METHODS = {
    "StudyModel.find_or_raise_by_id": ("study_id", "session", "for_update"),
    "StudyUserAttributeModel.find_by_study_and_key": ("study", "key", "session"),
    "TrialValueModel.value_to_stored_repr": ("value",),
    "TrialIntermediateValueModel.intermediate_value_to_stored_repr": ("value",),
}


def _models():
    """``optuna.storages._rdb.models``, checked: every table and column and helper used here."""
    module = "optuna.storages._rdb.models"
    try:
        models = importlib.import_module(module)
    except ImportError:
        raise _broken(module, "is missing") from None
    for name, columns in _COLUMNS.items():
        table = _attr(_attr(models, name, f"{module}.{name}"), "__table__", f"{module}.{name}.__table__")
        missing = columns - set(table.c.keys())
        if missing:
            raise _broken(f"{module}.{name}", f"has no column {', '.join(sorted(missing))}")
    for path, params in _METHODS.items():
        model, method = path.split(".")
        _takes(_attr(getattr(models, model), method, f"{module}.{path}"), params, f"{module}.{path}")
    return models


def _session(storage: RDBStorage):
    """One transaction on ``storage``, committed at the end (Optuna's own session helper)."""
    internal = "optuna.storages._rdb.storage._create_scoped_session"
    scoped = _takes(_from(*internal.rsplit(".", 1)), ("scoped_session", "ignore_integrity_error"), internal)
    return scoped(_attr(storage, "scoped_session", "optuna.storages.RDBStorage.scoped_session"))


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    # Optuna's trial table holds naive UTC (see its TrialModel.datetime_start setter).
    return None if moment is None else moment.astimezone(datetime.UTC).replace(tzinfo=None)


def rdb_set_study_user_attrs(storage: RDBStorage, study_id: int, attrs: dict) -> None:
    """Sets the study's user attrs ``attrs`` in one transaction.

    Replaces ``study.set_user_attr`` per key: one commit each.
    """
    models = _models()
    with _session(storage) as session:
        owner = models.StudyModel.find_or_raise_by_id(study_id, session)
        for key, value in attrs.items():
            attribute = models.StudyUserAttributeModel.find_by_study_and_key(owner, key, session)
            if attribute is None:
                session.add(models.StudyUserAttributeModel(study_id=owner.study_id, key=key, value_json=json.dumps(value)))
            else:
                attribute.value_json = json.dumps(value)


def rdb_add_trials(storage: RDBStorage, study_id: int, trials: list[FrozenTrial]) -> None:
    """Inserts finished ``trials`` into Optuna's tables in one transaction of bulk inserts.

    Replaces ``study.add_trials`` (``storage.create_new_trial`` per trial):
    one transaction per trial, and one statement per parameter and attribute.
    The trial numbers are taken under the study's row lock, as
    ``RDBStorage.create_new_trial`` takes them.
    """
    import sqlalchemy

    models = _models()
    with _session(storage) as session:
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


# ------------------------------------------------------------------ journal storages
def journal_appends_in_place(storage: BaseStorage) -> bool:
    """Whether ``storage`` is a journal whose backend only appends logs (a journal file;
    not one with snapshots, such as Redis), so :func:`journal_add_trials` applies."""
    if not isinstance(storage, JournalStorage):
        return False
    backend = _attr(storage, "_backend", "optuna.storages.JournalStorage._backend")
    return hasattr(backend, "append_logs") and not hasattr(backend, "save_snapshot")


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def journal_add_trials(storage: JournalStorage, study_id: int, trials: list[FrozenTrial]) -> None:
    """Appends the ``CREATE_TRIAL`` operations of finished ``trials`` in one write.

    Replaces ``study.add_trials`` (``JournalStorage.create_new_trial`` per
    trial): one file lock and one ``fsync`` per trial. The operations are the
    ones ``create_new_trial`` writes for a template.
    """
    internal = "optuna.storages.JournalStorage"
    operation = _attr(
        _from("optuna.storages.journal._storage", "JournalOperation"),
        "CREATE_TRIAL",
        "optuna.storages.journal._storage.JournalOperation.CREATE_TRIAL",
    )
    replay = _attr(storage, "_replay_result", f"{internal}._replay_result")
    worker = _attr(replay, "worker_id", f"{internal}._replay_result.worker_id")
    lock = _attr(storage, "_thread_lock", f"{internal}._thread_lock")
    sync = _attr(storage, "_sync_with_backend", f"{internal}._sync_with_backend")
    append = _attr(_attr(storage, "_backend", f"{internal}._backend"), "append_logs", f"{internal}._backend.append_logs")
    logs = []
    for t in trials:
        many = t.values is not None and len(t.values) > 1
        log = {
            "op_code": operation,
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
    with lock:
        append(logs)
        sync()
