"""Crash-safe checkpoints: pytrees and JSON metadata in one ``.npz`` file, no pickle.

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

import io
import json
import os
import pathlib
import zipfile

import jax
import numpy as np

__all__ = ["FORMAT_VERSION", "CheckpointError", "jsonable", "load_checkpoint", "save_checkpoint"]

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
