"""Crash-safe checkpoints: the one checkpoint and resume path of every training run.

FATHOM runs and baseline trials alike save the loop's
:class:`~fathom_tune.loop.Progress` with :func:`save_run` and continue from
:func:`load_run`; a *fingerprint* (what must match between the run that
wrote a checkpoint and the one that resumes it: task, seed, rounds, engine
settings, the tuner's settings) is stored with it, and a resume that
differs is refused with an error naming each field that differs.
:func:`exclusive` keeps two processes off one checkpoint.

The file format: pytrees and JSON metadata in one ``.npz`` file, no pickle.

A checkpoint holds named pytrees (model parameters, optimizer state,
FATHOM's moving average ``m``) as plain numeric arrays, and a JSON document
with the format ``version``, the ``kind`` of run, and whatever the run needs
to continue (its round, which is also its position in the random streams,
its ledger and history). Loading never unpickles: ``np.load`` runs with
``allow_pickle=False`` and every array is checked against the shape and
dtype of a template pytree the caller builds, so a file from another model
or a damaged file is refused with an error naming the path and the field.

Writes are atomic: the file is written next to its destination, flushed to
disk, and renamed over it, so a kill at any moment leaves either the old
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import zipfile

import filelock
import jax
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_path",
    "exclusive",
    "fingerprint",
    "jsonable",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
    "save_run",
]

FORMAT_VERSION = 1
"""The checkpoint format; a file with another version is refused."""

_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, or from another run."""


def jsonable(value):
    """``value`` with NumPy scalars (also inside dicts and lists) turned into Python ones.

    >>> jsonable({"a": np.float32(0.5), "b": [np.int64(2)]})
    {'a': 0.5, 'b': [2]}
    """
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


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
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
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
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; this fathom_tune "
            f"reads version {FORMAT_VERSION}"
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


def save_run(path, *, kind: str, fingerprint: dict, progress, trees: dict | None = None) -> pathlib.Path:
    """Atomically saves a run's :class:`~fathom_tune.loop.Progress` and extra ``trees``.

    Example:
        >>> import tempfile, fathom_tune
        >>> from fathom_tune.engine import Engine
        >>> from fathom_tune.loop import Progress
        >>> engine = Engine(fathom_tune.tasks.digits())
        >>> fp = fingerprint(engine, study="s", num_rounds=3, eval_every=1)
        >>> path = save_run(f"{tempfile.mkdtemp()}/r.npz", kind="demo", fingerprint=fp,
        ...                 progress=Progress(engine.init()))
        >>> load_run(path, kind="demo", fingerprint=fp, state=engine.init())[0].state.round
        0
    """
    done = progress
    meta = {
        "fingerprint": fingerprint,
        "round": done.state.round,
        "rng": {"seed": fingerprint.get("seed"), "round": done.state.round},
        "rows": jsonable(list(done.rows)),
        "cost": done.cost.as_dict(),
        "final_metrics": jsonable(done.final_metrics),
    }
    all_trees = {"params": done.state.params, "opt_state": done.state.opt_state, **(trees or {})}
    return save_checkpoint(path, kind=kind, meta=meta, trees=all_trees)


def load_run(path, *, kind: str, fingerprint: dict, state, templates: dict | None = None):
    """Reads a checkpoint of :func:`save_run`: ``(progress, trees)``.

    Args:
        path: the checkpoint file.
        kind: the expected kind.
        fingerprint: this run's :func:`fingerprint`; the checkpoint's must be equal.
        state: a fresh :class:`~fathom_tune.engine.ServerState`, the template
            of the stored model and optimizer state.
        templates: templates of the extra trees (e.g. FATHOM's ``m``).

    Raises:
        CheckpointError: damaged, of another kind, or another run's (the
            message names each field that differs and both values).
    """
    from fathom_tune.engine import Cost, ServerState
    from fathom_tune.loop import Progress

    extra = dict(templates or {})
    meta, trees = load_checkpoint(
        path, kind=kind, templates={"params": state.params, "opt_state": state.opt_state, **extra}
    )
    _differences(path, meta.get("fingerprint") or {}, fingerprint)
    restored = ServerState(params=trees["params"], opt_state=trees["opt_state"], round=meta["round"])
    progress = Progress(
        state=restored,
        rows=tuple(meta["rows"]),
        cost=Cost(**meta["cost"]),
        final_metrics=meta["final_metrics"],
    )
    return progress, {k: trees[k] for k in extra}


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
