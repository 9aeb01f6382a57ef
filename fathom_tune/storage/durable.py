"""What a checkpoint's ``.npz`` file and its history file share: the error both raise,
JSON-safe values, and making a new directory entry durable."""

from __future__ import annotations

import os
import pathlib

import numpy as np

__all__ = ["CheckpointError", "jsonable", "sync_directory"]


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


def sync_directory(directory: pathlib.Path) -> None:
    """Flushes ``directory``'s entries (a rename, a new file) to disk, where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
