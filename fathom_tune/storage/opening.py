"""Opening Optuna storages from what a user passes, with errors that name the argument.

One storage is the record of every tuner (see :mod:`fathom_tune.record`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import warnings

import optuna
import sqlalchemy
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend

__all__ = ["mask_url", "open_storage"]

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and reports).

    URLs are parsed and rendered by SQLAlchemy (``render_as_string(hide_password=True)``),
    so a password holding ``/`` or ``:`` is hidden whole; in anything else (a
    journal file path) a ``://user:password@`` part is masked all the same.

    >>> mask_url("postgresql://bob:se/cret@db:5432/optuna")
    'postgresql://bob:***@db:5432/optuna'
    """
    if _URL.match(url):
        try:
            return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not parseable: fall back to the pattern below
            pass
    # a path or an unparseable URL: hide anything that looks like ``://user:password@``
    # (also ``:/user:password@``, as a path that held a URL-like name is normalized)
    return re.sub(r"(:/+[^:/@]+:)[^@]+@", r"\1***@", url)


class _SQLiteStorage(RDBStorage):
    """An ``RDBStorage`` whose SQLite transactions are real and exclusive.

    Python's ``sqlite3`` module starts a transaction only at the first write,
    so Optuna's read-check-write steps (failing a stale trial, claiming a
    WAITING one) race between processes: two workers both see a stale trial
    RUNNING, both fail it, and both enqueue a retry. Here every transaction
    opens with ``BEGIN IMMEDIATE``, which takes SQLite's write lock before the
    read, so those steps run one process at a time. ``timeout`` (seconds) is
    how long a worker waits for that lock.
    """

    def __init__(self, url: str, *, timeout: float = 60, **kwargs) -> None:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": timeout, "isolation_level": None}}
        super().__init__(url, **kwargs)
        _begin_immediate(self.engine)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        _begin_immediate(self.engine)


def _begin_immediate(engine) -> None:
    # The driver no longer issues BEGIN itself (isolation_level=None), so
    # each transaction SQLAlchemy begins is opened here instead.
    sqlalchemy.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def _open_rdb(url: str, heartbeat: tuple[int, int] | None) -> BaseStorage:
    kwargs = {}
    if heartbeat is not None:
        kwargs["heartbeat_interval"], kwargs["grace_period"] = heartbeat
        kwargs["heartbeat_stale_trial_callback"] = RetryHeartbeatStaleTrialCallback(
            max_retry=1, inherit_intermediate_values=True
        )
    if url.startswith("sqlite"):
        return _SQLiteStorage(url, **kwargs)
    with _creating_tables(url):
        if not kwargs:
            return optuna.storages.get_storage(url)
        return RDBStorage(url, **kwargs)


_TABLES_LOCK = 0x6F7074756E61  # a fixed key ("optuna") for PostgreSQL's advisory lock


@contextlib.contextmanager
def _creating_tables(url: str):
    """On PostgreSQL, one process at a time opens a storage (Optuna creates its tables then).

    Processes that create Optuna's tables at the same moment on a fresh
    database collide (a unique violation on its enum types, optuna/optuna#1092);
    a session-level advisory lock, released when the connection closes even if
    the process dies, serialises that step. Other databases pass through.
    """
    if sqlalchemy.engine.make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _TABLES_LOCK})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _TABLES_LOCK})
    finally:
        engine.dispose()


def open_storage(
    storage, *, argument: str = "storage", heartbeat: tuple[int, int] | None = None
) -> BaseStorage | None:
    """An Optuna storage from ``storage``.

    Args:
        storage: ``None`` (in memory), an ``optuna.storages.BaseStorage``, an
            RDB URL (``sqlite:///path.db``, ``postgresql://...``), or the path
            of a journal file (``*.log``/``*.jsonl``; created if absent, its
            directory must exist).
        argument: the argument's name, for error messages.
        heartbeat: ``(interval, grace_period)`` in seconds for an RDB URL:
            every running trial records a heartbeat each ``interval``; one
            silent for ``grace_period`` (its worker was killed) is failed and
            retried once, with its intermediate values, by the next worker
            that starts a trial (Optuna's ``RetryHeartbeatStaleTrialCallback``).

            SQLite URLs open with transactions that take the database's write
            lock before they read (``BEGIN IMMEDIATE``) and wait up to 60 s
            for it, so concurrent workers never fail or claim one trial twice.

    Raises:
        ValueError: naming the argument and the (password-masked) value when
            the storage cannot be opened.
        TypeError: for any other kind of value.

    Example:
        >>> open_storage(None) is None
        True
    """
    if storage is None or isinstance(storage, BaseStorage):
        return storage
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str):
        raise TypeError(
            f"{argument} must be None, an optuna BaseStorage, an RDB URL or a journal file path, "
            f"got {type(storage).__name__}"
        )
    if _URL.match(storage):
        try:
            with warnings.catch_warnings():
                # Heartbeats and retries are Optuna features marked
                # experimental; they are used deliberately here.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _open_rdb(storage, heartbeat)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy, driver and URL errors alike
            raise ValueError(
                f"{argument}={mask_url(storage)!r} cannot be opened as an Optuna RDB storage: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    path = pathlib.Path(storage)
    if path.is_dir():
        raise ValueError(f"{argument}={storage!r} is a directory; give a journal file path or a URL")
    if not path.parent.is_dir():
        raise ValueError(f"{argument}={storage!r}: directory {str(path.parent)!r} does not exist")
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise ValueError(f"{argument}={storage!r} cannot be opened as a journal file: {exc}") from None
