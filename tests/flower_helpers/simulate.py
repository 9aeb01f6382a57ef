"""Runs a Flower app on Flower's simulation runtime, inside the caller's network namespace.

``python -m flower_helpers.simulate APP HOME RUN_CONFIG_JSON FEDERATION_CONFIG_JSON TIMEOUT``
brings the loopback interface up, starts a simulation SuperLink on
127.0.0.1, runs the app, waits for it (at most TIMEOUT seconds), stops the
SuperLink and prints ``{"status": ..., "logs": ...}`` as JSON. The test
runs it under ``unshare --net``: the simulation runtime (Ray) listens on all
interfaces, and in a private namespace "all" is the loopback only.
"""

from __future__ import annotations

import json
import pathlib
import sys

from flower_helpers import processes as P


def main(app: str, home: str, run_config: str, federation_config: str, timeout: str) -> None:
    P.loopback_up()
    home_dir = pathlib.Path(home)
    env = P.flower_env(home_dir)
    port = P.free_port()
    P.write_connection(home_dir, "sim", port)
    link = P.superlink(port, env, home_dir / "superlink.log", simulation=True)
    try:
        P.wait_for_port(port, link, 60, home_dir / "superlink.log")
        config = json.loads(run_config)
        run_id = P.submit(pathlib.Path(app), "sim", config, env, json.loads(federation_config))
        status = P.wait_for_run("sim", run_id, env, float(timeout), pathlib.Path(config["storage"]))
        logs = P.run_logs("sim", run_id, env)
    finally:
        P.stop(link)
    print(json.dumps({"status": status, "logs": logs}))


if __name__ == "__main__":
    main(*sys.argv[1:])
