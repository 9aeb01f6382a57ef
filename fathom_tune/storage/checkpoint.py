"""Crash-safe checkpoints: the one checkpoint and resume path of every training run.

FATHOM runs and baseline trials alike save the loop's
:class:`Progress` with :func:`save_run` and continue from
:func:`load_run`; a *fingerprint* (what must match between the run that
wrote a checkpoint and the one that resumes it: task, seed, rounds, engine
settings, the tuner's settings) is stored with it, and a resume that
differs is refused with an error naming each field that differs.
:func:`exclusive` keeps two processes off one checkpoint, and :func:`remove`
deletes a checkpoint with its history files (code that deletes a
checkpoint uses it, so no stale history file is taken for a fresh one).

The file format: pytrees and JSON metadata in one ``.npz`` file, no pickle,
and a run's history in an append-only JSON-lines file beside it.

A checkpoint holds named pytrees (model parameters, optimizer state,
FATHOM's moving average ``m``) as plain numeric arrays, and a JSON document
with the format ``version``, the ``kind`` of run, and whatever the run needs
to continue (its round, which is also its position in the random streams,
its ledger). Loading never unpickles: ``np.load`` runs with
``allow_pickle=False`` and every array is checked against the shape and
dtype of a template pytree the caller builds, so a file from another model
or a damaged file is refused with an error naming the path and the field.

Writes are atomic: the file is written next to its destination, flushed to
disk, and renamed over it, so a kill at any moment leaves either the old
checkpoint or the new one, never a torn file.

The history (one row per round) grows with the run, so :func:`save_run`
keeps it out of the ``.npz``, in an append-only JSON-lines file beside it
that the checkpoint's metadata records (``history``: the file's suffix, its
rows and bytes): see :mod:`fathom_tune.storage.history`. A save appends only
the new rows, so its cost does not grow with the run, and a kill at any
moment leaves a checkpoint whose rows are the ones it records.

Format version 2 added the history file; version 1 checkpoints, which hold
the rows in the metadata (``rows``), still load, and their next save moves
the rows into a history file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence

import filelock
import jax
import numpy as np

from fathom_tune.engine import Cost, ServerState
from fathom_tune.storage import history
from fathom_tune.storage.durable import CheckpointError, jsonable, sync_directory

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "CheckpointError",
    "Progress",
    "check_path",
    "exclusive",
    "fingerprint",
    "jsonable",
    "load_checkpoint",
    "load_run",
    "remove",
    "save_checkpoint",
    "save_run",
]

FORMAT_VERSION = 2
"""The checkpoint format written; files of the versions in ``READ_VERSIONS`` are read."""

READ_VERSIONS = (1, 2)
"""The checkpoint formats read (1: a run's rows inside the metadata); others are refused."""

_META = "__meta__"


@dataclasses.dataclass(frozen=True)
class Progress:
    """A run after some rounds: all :func:`run` needs to continue it.

    Attributes:
        state: the server state (the last accepted model; its ``round`` is
            also the position in the run's random streams).
        rows: the history rows so far (see :func:`run`; a sequence of dicts).
        cost: the ledger so far.
        final_metrics: the latest validation metrics.
    """

    state: ServerState
    rows: Sequence[dict] = ()
    cost: Cost = dataclasses.field(default_factory=Cost)
    final_metrics: dict = dataclasses.field(default_factory=dict)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def save_checkpoint(path, *, kind: str, meta: dict, trees: dict) -> pathlib.Path:
    """Atomically writes ``trees`` and ``meta`` to ``path`` (an ``.npz`` file).

    Args:
        path: the destination; its directory must exist.
        kind: what wrote it (e.g. ``"fathom"``); :func:`load_checkpoint` checks it.
        meta: JSON-serialisable metadata (NaN allowed).
        trees: ``{name: pytree}`` of numeric arrays.

    Returns:
        The path written.

    Example:
        >>> import tempfile, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> p = save_checkpoint(f"{d}/c.npz", kind="demo", meta={"round": 3}, trees={"w": [np.ones(2)]})
        >>> meta, trees = load_checkpoint(p, kind="demo", templates={"w": [np.zeros(2)]})
        >>> meta["round"], trees["w"][0].tolist()
        (3, [1.0, 1.0])
    """
    path = pathlib.Path(path)
    document = {"version": FORMAT_VERSION, "kind": kind, "meta": meta}
    arrays = {_META: np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)}
    for name, tree in trees.items():
        for i, leaf in enumerate(_leaves(tree)):
            if leaf.dtype == object:
                raise TypeError(f"checkpoint tree {name!r} leaf {i} is not numeric")
            arrays[f"{name}/{i}"] = leaf
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)  # make the rename itself durable
    return path


def load_checkpoint(path, *, kind: str, templates: dict) -> tuple[dict, dict]:
    """Reads a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.npz`` file.
        kind: the expected ``kind``.
        templates: ``{name: pytree}`` giving the structure, shapes and dtypes
            each stored tree must have (e.g. a freshly initialised model).

    Returns:
        ``(meta, trees)``, the trees rebuilt with the templates' structure.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, damaged, of
            another format version or kind, or its arrays do not match the
            templates; the message names the path and what is wrong.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged or not a checkpoint: {type(exc).__name__}: {exc}"
        ) from None
    if _META not in arrays or arrays[_META].dtype != np.uint8:
        raise CheckpointError(f"checkpoint {str(path)!r} has no metadata; not a fathom_tune checkpoint")
    try:
        document = json.loads(arrays.pop(_META).tobytes().decode())
        version, got_kind, meta = document["version"], document["kind"], document["meta"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has damaged metadata: {exc}") from None
    if version not in READ_VERSIONS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; this fathom_tune "
            f"reads versions {', '.join(map(str, READ_VERSIONS))}"
        )
    if got_kind != kind:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a {got_kind!r} run, not {kind!r}")
    trees = {}
    for name, template in templates.items():
        leaves, treedef = jax.tree_util.tree_flatten(template)
        stored = sorted(
            (k for k in arrays if k.rsplit("/", 1)[0] == name), key=lambda k: int(k.rsplit("/", 1)[1])
        )
        if len(stored) != len(leaves):
            raise CheckpointError(
                f"checkpoint {str(path)!r} field {name!r} holds {len(stored)} arrays; "
                f"this run's {name} has {len(leaves)} (another model?)"
            )
        out = []
        for i, (key, leaf) in enumerate(zip(stored, leaves)):
            value, want = arrays[key], np.asarray(leaf)
            if value.shape != want.shape or value.dtype != want.dtype:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} field {name!r} array {i} is {value.dtype}{list(value.shape)}; "
                    f"this run needs {want.dtype}{list(want.shape)} (another model?)"
                )
            out.append(value)
        trees[name] = jax.tree_util.tree_unflatten(treedef, out)
    return meta, trees


# ------------------------------------------------------------------ run level
def check_path(checkpoint, argument: str = "checkpoint") -> pathlib.Path | None:
    """``checkpoint`` as a path to a file in an existing directory (``None`` stays None)."""
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise TypeError(f"{argument} must be a file path or None, got {checkpoint!r}")
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"{argument}={str(path)!r} is a directory; give a file path such as run.npz")
    if not path.parent.is_dir():
        raise ValueError(f"{argument}={str(path)!r}: directory {str(path.parent)!r} does not exist")
    return path


def fingerprint(engine, *, study: str, num_rounds: int, eval_every: int | None, **tuner) -> dict:
    """What must match between a checkpoint and the run that resumes it.

    The task, seed and engine settings (:attr:`fathom_tune.Engine.settings`,
    the server optimizer by its behaviour), the study, the run's length and
    evaluation cadence, and the tuner's own settings (``tuner``, flattened
    as ``tuner.<name>``).
    """
    out = {
        "study": study,
        "task": engine.task.name,
        "seed": engine.seed,
        "num_rounds": num_rounds,
        "eval_every": eval_every,
        **{f"engine.{k}": v for k, v in engine.settings.as_dict().items()},
        **{f"tuner.{k}": v for k, v in tuner.items()},
    }
    return jsonable(out)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(path, got: dict, want: dict) -> None:
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {_short(got.get(k))}, this run {_short(want.get(k))}" for k in differ)
        raise CheckpointError(f"checkpoint {str(path)!r} belongs to another run: it differs in {detail}")


def _recorded_suffix(path: pathlib.Path) -> str | None:
    """The history file suffix the checkpoint at ``path`` records; None without one (no
    file, a version 1 file, a damaged file)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            document = json.loads(data[_META].tobytes().decode())
        return document["meta"]["history"]["suffix"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


# ------------------------------------------------------------------ saving and loading runs
def save_run(path, *, kind: str, fingerprint: dict, progress, trees: dict | None = None) -> pathlib.Path:
    """Saves a run's :class:`Progress` and extra ``trees``, crash-safely.

    The rows of ``progress`` that this process has not yet written to the
    checkpoint's history file are appended to it and flushed to disk; then
    the ``.npz`` (model, optimizer state, ``trees``, and the round, ledger,
    fingerprint and history record) is written atomically. A save costs
    O(new rows), not O(all rows). Rows that do not extend what this process
    last saved or loaded at ``path`` (a fresh run, a replaced checkpoint,
    fewer rows or another last row) are all written anew. Safe to call from
    a background thread; calls for one ``path`` run one at a time.

    Args:
        path: the ``.npz`` file; its directory must exist.
        kind: what wrote it (e.g. ``"fathom"``); :func:`load_run` checks it.
        fingerprint: the run's :func:`fingerprint`.
        progress: the :class:`Progress` to save.
        trees: ``{name: pytree}`` to save beside the model (e.g. FATHOM's ``m``).

    Returns:
        The path written.

    Example:
        >>> import tempfile, fathom_tune
        >>> from fathom_tune.engine import Engine
        >>> from fathom_tune.storage.checkpoint import Progress
        >>> engine = Engine(fathom_tune.tasks.digits())
        >>> fp = fingerprint(engine, study="s", num_rounds=3, eval_every=1)
        >>> path = save_run(f"{tempfile.mkdtemp()}/r.npz", kind="demo", fingerprint=fp,
        ...                 progress=Progress(engine.init()))
        >>> load_run(path, kind="demo", fingerprint=fp, state=engine.init())[0].state.round
        0
    """
    path = pathlib.Path(path)
    done = progress
    with history.lock(path):
        written, anew = history.append(path, done.rows, _recorded_suffix)
        meta = {
            "fingerprint": fingerprint,
            "round": done.state.round,
            "rng": {"seed": fingerprint.get("seed"), "round": done.state.round},
            "history": written.record(),
            "cost": done.cost.as_dict(),
            "final_metrics": jsonable(done.final_metrics),
        }
        all_trees = {"params": done.state.params, "opt_state": done.state.opt_state, **(trees or {})}
        save_checkpoint(path, kind=kind, meta=meta, trees=all_trees)
        history.saved(path, written, anew)
    return path


def load_run(path, *, kind: str, fingerprint: dict, state, templates: dict | None = None):
    """Reads a checkpoint of :func:`save_run`: ``(progress, trees)``.

    The rows are the ones the checkpoint records: the recorded number of
    bytes of its history file, which must parse to the recorded number of
    rows (lines past them, left by a kill during a save, are ignored). A
    version 1 checkpoint's rows come from its metadata.

    Args:
        path: the checkpoint file.
        kind: the expected kind.
        fingerprint: this run's :func:`fingerprint`; the checkpoint's must be equal.
        state: a fresh :class:`~fathom_tune.engine.ServerState`, the template
            of the stored model and optimizer state.
        templates: templates of the extra trees (e.g. FATHOM's ``m``).

    Raises:
        CheckpointError: damaged, of another kind, or another run's (the
            message names each field that differs and both values), or its
            history file is missing, shorter than recorded, or does not hold
            the recorded rows (the message names the file).
    """
    path = pathlib.Path(path)
    extra = dict(templates or {})
    with history.lock(path):
        identity = history.identity(path)
        meta, trees = load_checkpoint(
            path, kind=kind, templates={"params": state.params, "opt_state": state.opt_state, **extra}
        )
        _differences(path, meta.get("fingerprint") or {}, fingerprint)
        rows = history.read(path, meta, identity)
    restored = ServerState(params=trees["params"], opt_state=trees["opt_state"], round=meta["round"])
    progress = Progress(
        state=restored,
        rows=rows,
        cost=Cost(**meta["cost"]),
        final_metrics=meta["final_metrics"],
    )
    return progress, {k: trees[k] for k in extra}


def remove(path) -> None:
    """Deletes the checkpoint ``path`` and its history files (those missing are skipped).

    The ``.npz`` goes first: a kill in between leaves history files no
    checkpoint records, which the next save at ``path`` writes anew.
    """
    path = pathlib.Path(path)
    with history.lock(path):
        path.unlink(missing_ok=True)
        history.remove(path)


@contextlib.contextmanager
def exclusive(path, what: str = "checkpoint"):
    """Holds an exclusive OS lock on ``<path>.lock`` while a run uses ``path`` (``what``
    names it in the error: a checkpoint, an output directory).

    The operating system drops the lock when the process dies, so a stale
    lock file never blocks a resume (``filelock``: ``fcntl`` on POSIX,
    ``msvcrt`` on Windows).

    Raises:
        ValueError: another process (or another run in this one) holds it.
    """
    path = pathlib.Path(path)
    lock = filelock.FileLock(str(path.with_name(path.name + ".lock")), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ValueError(
            f"{what}={str(path)!r} is in use by another running process "
            f"(lock {lock.lock_file!r} is held); one run at a time"
        ) from None
    try:
        yield path
    finally:
        lock.release()
        pathlib.Path(lock.lock_file).unlink(missing_ok=True)  # filelock retries on an unlinked file
