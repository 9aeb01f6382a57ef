"""Starting and stopping Flower's processes on 127.0.0.1, every one with bounded waits.

Each process starts in its own session (process group), so stopping it also
stops the children Flower spawns under it (SuperExec, ServerApp and
ClientApp processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time

import optuna

from fathom_tune import open_storage, record

BIN = pathlib.Path(sys.executable).parent


def flower_env(home: pathlib.Path) -> dict[str, str]:
    """The environment of every Flower process of a test: this venv first on PATH, no
    telemetry, and one JAX compilation cache next to ``home`` for all of a test's processes
    (Flower starts a process per ClientApp message; each would compile the same steps)."""
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(home.parent / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
    )
    return env


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with contextlib.closing(socket.socket()) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}"
    )


def start(args: list[str], env: dict, log: pathlib.Path, cwd=None) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc._log_file = out  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops ``proc``'s process group: SIGTERM, then SIGKILL after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + timeout  # children that outlive the leader
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    log = getattr(proc, "_log_file", None)
    if log is not None:
        log.close()


def superlink(port: int, env: dict, log: pathlib.Path, *, simulation: bool) -> subprocess.Popen:
    args = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    return start(args + (["--simulation"] if simulation else []), env, log)


def supernode(
    link: int, port: int, partition: int, partitions: int, env: dict, log
) -> subprocess.Popen:
    args = [
        str(BIN / "flower-supernode"),
        "--insecure",
        "--superlink",
        f"127.0.0.1:{link}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        f"partition-id={partition} num-partitions={partitions}",
    ]
    return start(args, env, log)


def write_connection(home: pathlib.Path, name: str, port: int) -> None:
    """A Flower config (``$FLWR_HOME/config.toml``) whose SuperLink connection ``name``
    is the insecure local SuperLink on ``port``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def netns_prefix() -> list[str] | None:
    """The ``unshare`` command that runs a command in private network and PID namespaces.

    In the network namespace only the loopback interface exists, so servers
    that listen on all interfaces listen on 127.0.0.1 alone; the command is
    PID 1 of the PID namespace, so when it ends (or ``unshare`` is killed)
    the kernel ends every process it started. ``None`` when the system
    refuses namespaces.
    """
    args = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    args += [] if os.geteuid() == 0 else ["--map-root-user"]
    try:
        ok = (
            subprocess.run(args + ["true"], check=False, capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return args if ok else None


def loopback_up() -> None:
    """Brings ``lo`` up (a new network namespace starts with it down)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def _flwr(args: list[str], env: dict, timeout: float) -> str:
    done = subprocess.run(
        [str(BIN / "flwr"), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"flwr {' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def _toml(value) -> str:
    return (
        f"'{value}'"
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else repr(value)
    )


def submit(
    app: pathlib.Path,
    connection: str,
    run_config: dict,
    env: dict,
    federation_config: dict | None = None,
) -> int:
    """``flwr run APP CONNECTION`` with ``run_config`` overrides; returns the run id."""
    args = [
        "run",
        str(app),
        connection,
        "--format",
        "json",
        "--run-config",
        " ".join(f"{k}={_toml(v)}" for k, v in run_config.items()),
    ]
    if federation_config:
        args += [
            "--federation-config",
            " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items()),
        ]
    out = _flwr(args, env, timeout=120)
    return int(json.loads(out[out.index("{") :])["run-id"])


def run_status(connection: str, run_id: int, env: dict) -> str:
    out = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env, timeout=60)
    return json.loads(out[out.index("{") :])["runs"][0]["status"]


def wait_for_run(
    connection: str, run_id: int, env: dict, timeout: float, storage: pathlib.Path
) -> str:
    """The run's final status (``finished:completed``, ``finished:failed``, ...).

    Waits until the study in ``storage`` holds the run's outcome (cheap to
    read here) and asks Flower only every 15 s before that: every ``flwr``
    command starts a Python process, which costs a 2-core machine.
    """
    deadline = time.monotonic() + timeout
    asked = time.monotonic()
    status = "not asked"
    while time.monotonic() < deadline:
        done = _has_outcome(storage)
        if done or time.monotonic() - asked > 15:
            status, asked = run_status(connection, run_id, env), time.monotonic()
            if status.startswith("finished"):
                return status
        time.sleep(2 if done else 1)
    raise TimeoutError(f"run {run_id} not finished after {timeout} s (status {status!r})")


def _has_outcome(storage: pathlib.Path) -> bool:
    if not storage.exists():
        return False
    summaries = optuna.get_all_study_summaries(open_storage(str(storage)), include_best_trial=False)
    return any(record.LEDGER in s.user_attrs for s in summaries)


def run_logs(connection: str, run_id: int, env: dict) -> str:
    try:
        return _flwr(["log", str(run_id), connection, "--show"], env, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"<no logs: {exc}>"
