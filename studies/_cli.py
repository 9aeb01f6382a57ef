"""Checks shared by the ``studies`` command lines, run before anything is written.

Each returns why an option cannot be used, or None, without creating a file
or a directory; the command line reports it with ``parser.error`` (exit
status 2, the option named).
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import threading

__all__ = ["STARTS", "TASKS", "dashboard_command", "interruptible", "storage_problem", "unwritable_reason"]

SQLITE = "sqlite:///"
TASKS = ("digits", "fashion_mnist", "shakespeare", "synthetic")
"""The built-in offline tasks, ``fathom_tune.tasks.REGISTRY``'s names, named here so that
``--help`` needs no JAX (a test keeps the two equal)."""
STARTS = ("default", "eta/10", "eta*10", "B=4", "B=256")
"""The starting points ``studies.compare --starts`` takes, relative to the task's default
hyperparameters (:mod:`studies.starts`), named here so that ``--help`` needs no JAX."""
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # what fathom_tune.open_storage takes for a URL


def dashboard_command(storage: str, artifact_dir=None) -> str:
    """The command that shows ``storage`` in optuna-dashboard, bound to localhost only.

    The dashboard installed next to this Python (a virtualenv's ``bin``) is named by
    its path, relative when it lies below the working directory, so the command
    works as printed without activating the virtualenv. ``artifact_dir``: the
    file-system artifact store holding the report's figures
    (:mod:`studies.dashboard`), passed as ``--artifact-dir``.

    >>> dashboard_command("postgresql://bob:secret@db/optuna").endswith(
    ...     "optuna-dashboard --host 127.0.0.1 postgresql://bob:***@db/optuna")
    True
    >>> dashboard_command("sqlite:///reports/compare.db", "reports/artifacts").endswith(
    ...     "optuna-dashboard --host 127.0.0.1 --artifact-dir reports/artifacts sqlite:///reports/compare.db")
    True
    """
    import shlex

    from fathom_tune.storage import mask_url

    artifacts = "" if artifact_dir is None else f" --artifact-dir {shlex.quote(str(artifact_dir))}"
    return f"{_dashboard_executable()} --host 127.0.0.1{artifacts} {mask_url(storage)}"


def _dashboard_executable() -> str:
    beside = pathlib.Path(sys.executable).parent / "optuna-dashboard"
    if beside.exists():
        try:
            return str(beside.relative_to(pathlib.Path.cwd()))
        except ValueError:
            return str(beside)
    return shutil.which("optuna-dashboard") or "optuna-dashboard"


@contextlib.contextmanager
def interruptible():
    """While inside, SIGINT (Ctrl-C) and SIGTERM both raise ``KeyboardInterrupt``, so every
    way of stopping a command leaves the same state behind.

    Python raises a signal's exception wherever the main thread is, also inside a
    finalizer, which swallows it ("Exception ignored in ..."); the interrupt is
    therefore raised again a second later unless the block has been left by then.
    """
    again: list[threading.Timer] = []

    def stop(signum, frame):
        if not again:
            timer = threading.Timer(1.0, signal.raise_signal, args=(signal.SIGINT,))
            timer.daemon = True
            again.append(timer)
            timer.start()
        raise KeyboardInterrupt

    def unraisable(info):  # the swallowed interrupt is raised again: no traceback for it
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)

    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for timer in again:
            timer.cancel()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook


def unwritable_reason(path: pathlib.Path) -> str | None:
    """Why ``path`` cannot become a writable directory, or None.

    The nearest existing ancestor must be a directory in which a file can be
    created (probed with a temporary file that is removed at once).
    """
    path = pathlib.Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"directory {str(probe)!r} is not writable ({exc.strerror or exc})"
    return None


def storage_problem(storage: str) -> str | None:
    """Why ``storage`` (a ``--storage`` value) cannot be opened, or None.

    ``sqlite:///<path>``: the path must not be a directory, and its directory
    must exist or be creatable. Another URL: its scheme must name an
    SQLAlchemy dialect (a server is only reached when the storage is opened).
    A journal file path: not a directory, in an existing directory. The
    message masks any password (:func:`fathom_tune.storage.mask_url`).

    >>> storage_problem("sqlite:///reports/x.db") is None
    True
    >>> print(storage_problem("nosuchdb://bob:secret@host/x"))  # doctest: +ELLIPSIS
    'nosuchdb://bob:***@host/x' is not an Optuna RDB URL (NoSuchModuleError: ...)
    """
    import sqlalchemy.engine

    from fathom_tune.storage import mask_url

    shown = repr(mask_url(storage))
    if storage.startswith(SQLITE):
        db = pathlib.Path(storage[len(SQLITE) :])
        if db.exists() and not db.is_file():
            return f"{shown}: {str(db)!r} is not a file"
        why = unwritable_reason(db.parent)
        return f"{shown}: {why}" if why else None
    if URL.match(storage):
        try:
            sqlalchemy.engine.make_url(storage).get_dialect()
        except Exception as exc:  # noqa: BLE001 - parse and plugin errors alike
            return f"{shown} is not an Optuna RDB URL ({type(exc).__name__}: {mask_url(str(exc))})"
        return None
    path = pathlib.Path(storage)
    if path.is_dir():
        return f"{shown} is a directory; give a journal file path or a URL"
    if not path.parent.is_dir():
        return f"{shown}: directory {str(path.parent)!r} does not exist"
    if not path.exists():
        return unwritable_reason(path.parent)
    return None
