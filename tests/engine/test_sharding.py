"""Clients split over four devices give one device's results (XLA:CPU, forced host devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "_sharded.py"


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["resident", "host", "per_client", "local_rate"])
def test_four_devices_equal_one_within_float32(four_devices, case):
    out = four_devices[case]
    assert out["devices"] == 4
    assert out["param_devices"] == 4  # the server model is replicated on every device
    assert out["client_block"] % 4 == 0
    assert out["steps_equal"]
    # Sums over clients in another order: float32 rounding, far below any update.
    assert out["params"] <= 1e-5 * max(out["scale"], 1.0)
    assert out["loss"] <= 1e-5
    assert out.get("statistic", 0.0) <= 1e-5
    assert out.get("validation", 0.0) <= 1e-5
    assert out.get("local_rate", 0.0) <= 1e-5
    assert out.get("rate_moved", 1.0) > 1e-3  # FedHyper-CL's factors did change the clients' rates
    assert out["evaluate"] == 0.0


def test_each_path_is_the_one_asked_for(four_devices):
    # Six clients on four devices: blocks of eight (two padding clients) kept on
    # the devices; one client per device gathers on the host.
    assert four_devices["resident"]["resident"] and four_devices["resident"]["client_block"] == 8
    assert not four_devices["host"]["resident"] and four_devices["host"]["client_block"] == 4


def test_a_block_that_does_not_split_over_the_devices_is_refused(four_devices):
    assert four_devices["block_error"] == (
        "client_block must be a multiple of the 4 devices the clients are split over, got 6; "
        "pass devices=1 to train on one device"
    )
