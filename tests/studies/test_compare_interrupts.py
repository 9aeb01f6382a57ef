"""Interrupted comparisons (Ctrl-C, SIGTERM, a crash) end with the uninterrupted numbers.

Apart from tests/test_compare.py so that the two long files run in parallel workers.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
from _toy import crash_in_round
from optuna.trial import TrialState

from studies import compare

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_interrupted_fathom_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):

    from fathom_tune.engine import Engine

    url = f"sqlite:///{tmp_path / 'compare.db'}"
    argv = ["--rounds", "6", "--seeds", "0", "--tuners", "fathom", "--no-progress"]
    argv += ["--storage", url, "--out", str(tmp_path)]
    real = crash_in_round(monkeypatch, 3, KeyboardInterrupt)
    assert compare.main(argv) == 130  # one line and the resume hint, no traceback
    assert capsys.readouterr().err.strip().endswith("run the same command again to continue")
    first = optuna.load_study(study_name="digits/fathom/seed0", storage=url).trials
    assert (tmp_path / "checkpoints" / "digits-fathom-seed0.npz").exists()
    monkeypatch.setattr(Engine, "run_round", real)
    capsys.readouterr()
    assert compare.main(argv) == 0
    # rounds 0-2 written at the interrupt; rounds 3, 4, 5 after
    assert "digits/fathom/seed0: 3 new trials, 6 in all, 6 rounds spent" in capsys.readouterr().out
    trials = optuna.load_study(study_name="digits/fathom/seed0", storage=url).trials
    assert [(t.state, t.user_attrs["round"]) for t in trials] == [(TrialState.COMPLETE, r) for r in range(6)]
    assert [t.value for t in trials[:3]] == [t.value for t in first]


_STALLING = """
import pathlib, sys, time
import fathom_tune.storage.checkpoint
from fathom_tune.engine import Engine
from studies import compare

marks = pathlib.Path(sys.argv[1])

def stall(point):  # once per point over every process: mark it, then wait for the signal
    mark = marks / point
    if not mark.exists():
        mark.touch()
        time.sleep(300)

real_round, real_save = Engine.run_round, fathom_tune.storage.checkpoint.save_run

def run_round(self, state, hparams):
    if state.round == 3 and self.client_statistic is not None:
        stall("fathom-round")
    return real_round(self, state, hparams)

def save_run(path, **kwargs):
    real_save(path, **kwargs)
    study = kwargs["fingerprint"]["study"]
    if kwargs["kind"] == "baseline-trial":
        stall(study.split("/")[1])

Engine.run_round, fathom_tune.storage.checkpoint.save_run = run_round, save_run
sys.exit(compare.main(sys.argv[2:]))
"""
"""A child comparison that stops, once each, inside FATHOM's round 3 and inside the
first checkpointed trial of each search, so a test can interrupt it exactly there."""


def _wait_for(mark: pathlib.Path, proc, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the comparison ended before {mark.name}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{mark.name} not reached in time")
        time.sleep(0.05)


def _trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_interrupted_comparison_gives_the_uninterrupted_numbers(tmp_path):
    # Interrupted three times (SIGINT inside a FATHOM round, SIGTERM inside a random
    # search trial, SIGINT inside a Hyperband trial) and re-run each time: the same
    # trials, hyperparameters, costs and report cells as one uninterrupted run.
    tuners = ["fathom", "random", "tpe+hyperband"]
    base = ["--rounds", "6", "--budget-rounds", "18", "--seeds", "0", "--no-progress", "--tuners", *tuners]
    assert compare.main([*base, "--out", str(tmp_path / "once")]) == 0
    out, marks = tmp_path / "interrupted", tmp_path / "marks"
    marks.mkdir()
    url = f"sqlite:///{out / 'compare.db'}"
    argv = [sys.executable, "-c", _STALLING, str(marks), *base, "--out", str(out)]
    points = [(signal.SIGINT, "fathom-round"), (signal.SIGTERM, "random"), (signal.SIGINT, "tpe+hyperband")]
    for signum, point in points:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(marks / point, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1].endswith("run the same command again to continue"), err
        assert "Traceback" not in err
    running = [t for t in _trials(url, "digits/tpe+hyperband/seed0") if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0].user_attrs["interrupted"] is True
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    def table(root, name, drop=("total_seconds", "total_compile_seconds")):
        df = pd.read_csv(root / "digits" / name)
        return df.drop(columns=[c for c in df.columns if c.startswith(drop)])

    for name in ("per_seed.csv", "summary.csv", "curves.csv"):
        pd.testing.assert_frame_equal(table(out, name), table(tmp_path / "once", name))
    once = f"sqlite:///{tmp_path / 'once' / 'compare.db'}"
    for tuner in tuners[1:]:  # the search studies: trial for trial, in place, no retries
        got = [(t.number, t.state, t.params, t.value) for t in _trials(url, f"digits/{tuner}/seed0")]
        want = [(t.number, t.state, t.params, t.value) for t in _trials(once, f"digits/{tuner}/seed0")]
        assert got == want, tuner
    assert sorted(p.name for p in (out / "checkpoints").rglob("*")) == sorted(
        p.name for p in (tmp_path / "once" / "checkpoints").rglob("*")
    )


