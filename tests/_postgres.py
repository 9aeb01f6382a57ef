"""A throwaway PostgreSQL server for tests, and ``_jobs.py`` jobs that signal their stall.

:func:`server` runs ``initdb`` into a fresh temporary directory and starts the
server with ``pg_ctl`` on 127.0.0.1 at a free port (its Unix socket inside that
directory; ``trust`` authentication for TCP connections from 127.0.0.1 only,
nothing else accepted), then stops it and removes the directory. The
binaries come from ``pg_config --bindir`` or ``/usr/lib/postgresql/<version>/bin``
(Debian's ``postgresql`` package, which ``.ci/run`` installs). PostgreSQL
refuses to run as root: as root, the server runs as the ``postgres`` system
user that Debian's package creates (through ``runuser``), otherwise as the
invoking user. :class:`Unavailable` says why no server could be had.

``python tests/_postgres.py <marker> <job> <args>...`` runs ``_jobs.py``'s
``job`` with the same arguments, but its stall touches ``marker`` before it
hangs, so a test kills the job exactly there without reading the storage
(a run that holds rounds back from the storage could not be watched).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).parent
USER = "postgres"
"""The database superuser the tests connect as; when root, also the system user of the server."""


class Unavailable(Exception):
    """No server: the binaries are absent or the server could not start (the message says which)."""


def _version(path: pathlib.Path) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in path.parent.name.split("."))


def find_bindir() -> pathlib.Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = []
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], check=False, capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(pathlib.Path(out.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    versions = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    candidates += versions
    for path in candidates:
        if all(os.access(path / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, bindir: pathlib.Path, root: pathlib.Path, as_user: str | None):
        self.bindir, self.root, self.as_user = bindir, root, as_user
        self.data, self.log = root / "data", root / "server.log"
        self.port: int | None = None

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.as_user, "--"] if self.as_user else []
        return subprocess.run(
            [*prefix, str(self.bindir / args[0]), *args[1:]],
            check=False,
            cwd=self.root,  # a directory the server's user may enter
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def init(self) -> None:
        out = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth=trust",
            "--no-sync",
        )
        if out.returncode != 0:
            raise Unavailable(
                f"initdb failed (exit {out.returncode}): {(out.stdout + out.stderr)[-1500:]}"
            )
        # TCP from 127.0.0.1 only; the socket directory is the server user's own.
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")

    def start(self) -> None:
        errors = []
        for _ in range(3):  # another process may take the free port first
            self.port = _free_port()
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.root}'\n"
                )
            out = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
            )
            if out.returncode == 0:
                return
            errors.append(
                f"pg_ctl start (exit {out.returncode}): {(out.stdout + out.stderr)[-500:]}"
                f" server log: {self._log_tail()}"
            )
            self.stop()
        raise Unavailable("; ".join(errors))

    def stop(self) -> None:
        # Immediate: no shutdown checkpoint, as the data is thrown away.
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Creates database ``name``; returns its SQLAlchemy URL."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def _scratch(other_user: bool) -> str | None:
    """The directory for the server's files: a roomy ``/dev/shm`` (deleting a data
    directory from a disk mounted with ``discard`` takes seconds), else ``/tmp`` when
    another user runs the server (it must reach the directory), else the default."""
    try:
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize >= 1 << 30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return "/tmp" if other_user else None


@contextlib.contextmanager
def server():
    """A running throwaway server (``.url(db)``, ``.create_database(name)``, ``.port``).

    Raises:
        Unavailable: no binaries (the message starts "PostgreSQL binaries not
            found") or the server could not start ("PostgreSQL server could not
            start"), with the reason.
    """
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(
            "PostgreSQL binaries not found: no initdb, pg_ctl and postgres in `pg_config --bindir` "
            "or /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql, as .ci/run does)"
        )
    as_user = None
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            raise Unavailable(
                f"PostgreSQL server could not start: running as root, and there is no {USER!r} "
                "system user to run it as (PostgreSQL refuses to run as root)"
            ) from None
        if shutil.which("runuser") is None:
            raise Unavailable(
                "PostgreSQL server could not start: running as root without `runuser`"
            )
        as_user = USER
    root = pathlib.Path(tempfile.mkdtemp(prefix="fathom-pg-", dir=_scratch(as_user is not None)))
    srv = _Server(bindir, root, as_user)
    started = False
    try:
        if as_user is not None:
            os.chown(root, pw.pw_uid, pw.pw_gid)
        try:
            srv.init()
            srv.start()
        except Unavailable as exc:
            raise Unavailable(f"PostgreSQL server could not start ({bindir}): {exc}") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(
                f"PostgreSQL server could not start ({bindir}): {type(exc).__name__}: {exc}"
            ) from None
        started = True
        yield srv
    finally:
        if started:
            srv.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ jobs


def start_job(marker: pathlib.Path | None, *args) -> subprocess.Popen:
    """Runs ``_jobs.py`` ``args`` in a child process; its stall touches ``marker``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__)), str(marker or ""), *map(str, args)],
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


if __name__ == "__main__":
    # the repository root before tests/ (whose baselines/ and studies/ would shadow the packages)
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import _jobs

    marker = pathlib.Path(sys.argv[1]) if sys.argv[1] else None

    def _hang(*args, **kwargs):
        if marker is not None:
            marker.touch()
        time.sleep(3600)

    _jobs._hang = _hang
    {"fathom": _jobs.fathom, "baseline": _jobs.baseline}[sys.argv[2]](*sys.argv[3:])
