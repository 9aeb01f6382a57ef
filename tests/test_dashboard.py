"""optuna-dashboard shows every study of a comparison (checked in headless Chromium).

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``) and the
``dashboard`` extra; the test is skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from studies import compare

DASHBOARD = shutil.which("optuna-dashboard") or str(
    pathlib.Path(sys.executable).with_name("optuna-dashboard")
)
TUNERS = ["fathom", "random", "tpe+hyperband"]
NAMES = [f"digits/{t}/seed0" for t in TUNERS]

pytestmark = pytest.mark.skipif(
    not pathlib.Path(DASHBOARD).exists(),
    reason="optuna-dashboard is not installed (pip install 'fathom-tune[dashboard]')",
)
needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not on PATH (Debian: apt-get install -y chromium)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{out / 'compare.db'}"
    argv = [
        "--rounds",
        "4",
        "--budget-rounds",
        "8",
        "--seeds",
        "0",
        "--tuners",
        *TUNERS,
        "--storage",
        url,
        "--out",
        str(out),
        "--no-progress",
    ]
    assert compare.main(argv) == 0
    port = _free_port()
    with open(out / "dashboard.log", "wb") as log:
        proc = subprocess.Popen(
            [DASHBOARD, url, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"{base}/api/studies")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"optuna-dashboard did not start: {(out / 'dashboard.log').read_text()}"
                )
            time.sleep(0.3)
        yield base, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _render(url: str, profile) -> str:
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_dashboard_lists_every_study_of_the_comparison(dashboard, tmp_path):
    base, _ = dashboard
    dom = _render(f"{base}/dashboard", tmp_path / "profile")
    for name in NAMES:
        assert name in dom, f"{name} not in the rendered study list"


def test_dashboard_serves_fathom_rounds_and_baseline_intermediate_values(dashboard):
    base, _ = dashboard
    studies = {
        s["study_name"]: s["study_id"]
        for s in json.loads(_get(f"{base}/api/studies")[1])["study_summaries"]
    }
    assert set(NAMES) <= set(studies)
    fathom = json.loads(_get(f"{base}/api/studies/{studies[NAMES[0]]}?after=0")[1])
    assert len(fathom["trials"]) == 4  # one trial per round
    for trial in fathom["trials"]:
        assert {p["name"] for p in trial["params"]} == {
            "learning_rate",
            "local_epochs",
            "batch_size",
        }
    random = json.loads(_get(f"{base}/api/studies/{studies[NAMES[1]]}?after=0")[1])
    assert all(t["intermediate_values"] for t in random["trials"])
