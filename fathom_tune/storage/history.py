"""A checkpoint's history: its rows, one per round, in an append-only file beside it.

The history grows with the run, so
:func:`~fathom_tune.storage.checkpoint.save_run` keeps it out of the
``.npz``: the rows go to ``<checkpoint>.rows.jsonl`` (or
``<checkpoint>.rows.alt.jsonl``, see below), one JSON line per row (NaN
allowed), and the metadata's ``history`` entry records that file's suffix
and how many rows (``rows``) and how many of its bytes (``bytes``) belong
to the checkpoint. A save appends only the rows not yet in the file,
flushes it to disk, and then writes the ``.npz``; its cost does not grow
with the run. :func:`~fathom_tune.storage.checkpoint.load_run` reads
exactly the recorded bytes and refuses a file that holds fewer or that
does not parse to the recorded number of rows. So a kill at any moment
leaves a checkpoint whose rows are the ones it records:

- lines past the recorded bytes (a kill between the append and the rename
  of the ``.npz``, maybe mid-line) are ignored when loading and cut off by
  the next save;
- a save that cannot append (a fresh run; a checkpoint replaced since this
  process last wrote or read it; rows that do not continue the saved ones:
  fewer of them, or another last one) writes every row anew, into the one
  of the two files the checkpoint on disk does not use, and deletes the
  other once the new ``.npz`` is in place, so the old checkpoint stays
  whole until then.

What this process last wrote or read of each checkpoint's history is kept
here, so a save appends without reading the file back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import threading
from collections.abc import Callable

from fathom_tune.storage.durable import CheckpointError, jsonable, sync_directory

__all__ = ["SUFFIXES", "Written", "append", "file_of", "identity", "lock", "read", "remove", "saved"]

SUFFIXES = (".rows.jsonl", ".rows.alt.jsonl")
"""The two history files a checkpoint ``c.npz`` may use: ``c.npz.rows.jsonl`` and
``c.npz.rows.alt.jsonl``."""


@dataclasses.dataclass(frozen=True)
class Written:
    """What this process last wrote or read of a checkpoint's history.

    Attributes:
        checkpoint: the identity (:func:`identity`) of the ``.npz`` file then.
        suffix: the history file it records (one of ``SUFFIXES``).
        rows: how many rows it records.
        size: how many bytes of the history file those rows take.
        last: the JSON line (:func:`_line`) of the last of them, ``b""`` when none.
    """

    checkpoint: tuple | None
    suffix: str
    rows: int
    size: int
    last: bytes

    def record(self) -> dict:
        """The checkpoint metadata's ``history`` entry."""
        return {"suffix": self.suffix, "rows": self.rows, "bytes": self.size}


_written: dict[str, Written] = {}
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _key(path: pathlib.Path) -> str:
    return os.path.abspath(path)


def lock(path: pathlib.Path) -> threading.Lock:
    """The lock that orders this process's saves, loads and removals of ``path``."""
    with _locks_guard:
        return _locks.setdefault(_key(path), threading.Lock())


def file_of(path: pathlib.Path, suffix: str) -> pathlib.Path:
    return path.with_name(path.name + suffix)


def identity(path: pathlib.Path) -> tuple | None:
    """``path``'s inode, size and modification time (None if it does not exist): an
    atomic rewrite of a checkpoint changes it."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _line(row) -> bytes:
    """``row`` as one line of a history file."""
    return json.dumps(jsonable(row), separators=(",", ":")).encode() + b"\n"


def _continues(path: pathlib.Path, known: Written | None, rows) -> bool:
    """Whether ``rows`` extend the history ``known`` of the checkpoint at ``path``.

    The checkpoint must be the one this process last wrote or read, ``rows``
    at least as many as it records with the same last of them, and its
    history file at least as long as recorded. O(1) in the number of rows.
    """
    if known is None or known.checkpoint is None or identity(path) != known.checkpoint:
        return False
    if len(rows) < known.rows or (known.rows and _line(rows[known.rows - 1]) != known.last):
        return False
    try:
        return os.stat(file_of(path, known.suffix)).st_size >= known.size
    except OSError:
        return False


def append(
    path: pathlib.Path, rows, recorded_suffix: Callable[[pathlib.Path], str | None]
) -> tuple[Written, bool]:
    """Writes the rows the history file of checkpoint ``path`` lacks and flushes it to disk.

    Rows that continue what this process last wrote or read (:func:`_continues`)
    are appended after its recorded bytes, cutting off anything past them;
    otherwise every row is written anew into the history file the checkpoint
    on disk does not use (``recorded_suffix(path)`` reads the one it records,
    None without one). Call it holding :func:`lock`, then :func:`saved` once
    the checkpoint records what it returns.

    Returns:
        ``(what the next checkpoint records, whether the file was written anew)``.
    """
    known = _written.get(_key(path))
    if _continues(path, known, rows):
        suffix, start, offset, last, anew = known.suffix, known.rows, known.size, known.last, False
    else:
        current = known is not None and known.checkpoint is not None and identity(path) == known.checkpoint
        used = known.suffix if current else recorded_suffix(path)
        suffix = next(s for s in SUFFIXES if s != used)
        start, offset, last, anew = 0, 0, b"", True
    lines = [_line(rows[i]) for i in range(start, len(rows))]
    data = b"".join(lines)
    file = file_of(path, suffix)
    with open(file, "wb" if anew else "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if anew:
        sync_directory(file.parent)
    written = Written(None, suffix, len(rows), offset + len(data), lines[-1] if lines else last)
    return written, anew


def saved(path: pathlib.Path, written: Written, anew: bool) -> None:
    """Notes that the checkpoint now at ``path`` records ``written``; after a history
    written anew, deletes the other history file (no checkpoint's now)."""
    _written[_key(path)] = dataclasses.replace(written, checkpoint=identity(path))
    if anew:
        for suffix in SUFFIXES:
            if suffix != written.suffix:
                file_of(path, suffix).unlink(missing_ok=True)


def read(path: pathlib.Path, meta: dict, checkpoint: tuple | None) -> tuple:
    """The rows the checkpoint at ``path`` (metadata ``meta``, :func:`identity`
    ``checkpoint`` when read) records; a version 1 checkpoint's are in ``meta``.
    Call it holding :func:`lock`."""
    rows, got = _read(path, meta)
    if got is None:
        _written.pop(_key(path), None)
    else:
        _written[_key(path)] = dataclasses.replace(got, checkpoint=checkpoint)
    return rows


def remove(path: pathlib.Path) -> None:
    """Deletes the history files of checkpoint ``path`` (those missing are skipped)."""
    for suffix in SUFFIXES:
        file_of(path, suffix).unlink(missing_ok=True)
    _written.pop(_key(path), None)


def _read(path: pathlib.Path, meta: dict) -> tuple[tuple, Written | None]:
    if "history" not in meta:
        if isinstance(meta.get("rows"), list):
            return tuple(meta["rows"]), None
        raise CheckpointError(f"checkpoint {str(path)!r} records no history; not a run checkpoint")
    record = meta["history"]
    damaged = CheckpointError(f"checkpoint {str(path)!r} has a damaged history record {record!r}")
    try:
        suffix, count, size = record["suffix"], record["rows"], record["bytes"]
    except (KeyError, TypeError):
        raise damaged from None
    if suffix not in SUFFIXES or not all(type(n) is int and n >= 0 for n in (count, size)):
        raise damaged
    file = file_of(path, suffix)
    try:
        with open(file, "rb") as f:
            data = f.read(size)
    except OSError as exc:
        raise _bad_history(path, file, f"cannot be read: {exc}") from None
    if len(data) < size:
        raise _bad_history(
            path, file, f"holds {len(data)} bytes, fewer than the {size} the checkpoint records"
        )
    rows = _parse_rows(path, file, data, count)
    return rows, Written(None, suffix, count, size, _line(rows[-1]) if rows else b"")


def _parse_rows(path: pathlib.Path, file: pathlib.Path, data: bytes, count: int) -> tuple:
    """The ``count`` rows in ``data``: the bytes of history file ``file`` that checkpoint
    ``path`` records."""
    lines = data.split(b"\n")
    if lines.pop() != b"":
        raise _bad_history(path, file, f"does not end a line at byte {len(data)}, where its rows end")
    if len(lines) != count:
        raise _bad_history(
            path, file, f"holds {len(lines)} rows in its first {len(data)} bytes, not the {count} recorded"
        )
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise _bad_history(path, file, f"line {number} is not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise _bad_history(path, file, f"line {number} is not a JSON object")
        rows.append(row)
    return tuple(rows)


def _bad_history(path: pathlib.Path, file: pathlib.Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: its history file {str(file)!r} {what}")
