"""optuna-dashboard shows every study of a comparison, the runs like with like and the
report attached (:mod:`studies.dashboard`; the pages checked in headless Chromium).

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``) and the
``dashboard`` extra; the test is skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import optuna
import pytest

from fathom_tune import Cost, Target, record
from studies import compare
from studies import dashboard as board

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
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert compare.main(argv) == 0
    # the dashboard command the comparison prints, as printed
    command = shlex.split(printed.getvalue().strip().splitlines()[-1].split("dashboard: ", 1)[1])
    assert command[-1] == url and "--artifact-dir" in command
    port = _free_port()
    with open(out / "dashboard.log", "wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--server", "wsgiref"],
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
        yield base, out, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _render(url: str, profile, *extra: str) -> str:
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
        "--window-size=1600,1000",
        *(extra or ["--dump-dom"]),
        url,
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_dashboard_lists_every_study_of_the_comparison(dashboard, tmp_path):
    base, _, _ = dashboard
    dom = _render(f"{base}/dashboard", tmp_path / "profile")
    for name in NAMES:
        assert name in dom, f"{name} not in the rendered study list"


def test_dashboard_serves_fathom_rounds_and_baseline_intermediate_values(dashboard):
    base, _, _ = dashboard
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
    # the run studies name their values too: a round's training loss, a run's validation accuracy
    assert fathom["objective_names"] == ["train_loss"]
    random = json.loads(_get(f"{base}/api/studies/{studies[NAMES[1]]}?after=0")[1])
    assert random["objective_names"] == ["val_accuracy"]
    assert all(t["intermediate_values"] for t in random["trials"])


# ------------------------------------------------------------------ like with like
def _evaluations(study: optuna.Study) -> list[tuple[int, int, float]]:
    """Independently of fathom_tune.record's reader: every evaluation of a run study as
    (cumulative rounds, cumulative examples, validation accuracy), from the raw trial attrs."""
    out, rounds, examples = [], 0, 0
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.user_attrs.get("stale"):
            continue
        for e in t.user_attrs.get("evals", []):
            out.append((rounds + e["rounds"], examples + e["examples"], e["val_accuracy"]))
        rounds += t.user_attrs.get("cost", {}).get("rounds", 0)
        examples += t.user_attrs.get("cost", {}).get("examples", 0)
    return out


def _companions(url: str) -> tuple[int, dict[str, optuna.Study]]:
    """The grid step computed from the raw evaluations, and each run's companion study."""
    evals = {n: _evaluations(optuna.load_study(study_name=n, storage=url)) for n in NAMES}
    step = math.gcd(*(r for ev in evals.values() for r, _, _ in ev))
    scale = "round" if step == 1 else f"{step} rounds"
    names = {n: f"{n}/val_accuracy by {scale}" for n in NAMES}
    return step, {n: optuna.load_study(study_name=c, storage=url) for n, c in names.items()}


def test_every_run_has_a_companion_study_of_its_evaluations_at_cumulative_rounds(dashboard):
    _, _, url = dashboard
    step, companions = _companions(url)
    assert step > 1  # the tiny comparison evaluates every 4 rounds: no empty trials but trial 0
    all_names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    assert all_names == set(NAMES) | {c.study_name for c in companions.values()}
    for name, companion in companions.items():
        evals = _evaluations(optuna.load_study(study_name=name, storage=url))
        assert evals and all(r % step == 0 for r, _, _ in evals)
        assert companion.metric_names == ["val_accuracy"]
        assert companion.direction == optuna.study.StudyDirection.MAXIMIZE
        assert companion.user_attrs["companion_of"] == name
        trials = sorted(companion.trials, key=lambda t: t.number)
        assert [t.number for t in trials] == list(range(evals[-1][0] // step + 1))
        done = {t.number: t for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
        assert {n: t.value for n, t in done.items()} == pytest.approx({r // step: v for r, _, v in evals})
        for r, examples, _ in evals:
            t = done[r // step]
            assert t.params == {"cum_rounds": r, "cum_examples": examples}
            assert (t.user_attrs["cum_rounds"], t.user_attrs["cum_examples"]) == (r, examples)
        empty = [t for t in trials if t.number not in done]
        assert [t.number for t in empty][:1] == [0]
        assert all(t.state == optuna.trial.TrialState.FAIL and t.values is None for t in empty)
        assert all(not t.user_attrs["evaluation"] for t in empty)


def _snapshot(url: str, artifacts: pathlib.Path):
    import optuna_dashboard

    studies = {}
    for s in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=s.study_name, storage=url)
        metas = sorted((m.filename, m.artifact_id) for m in optuna.artifacts.get_all_artifact_meta(study))
        studies[s.study_name] = (s._study_id, s.n_trials, optuna_dashboard.get_note(study), metas)
    files = {p.name: p.stat().st_mtime_ns for p in artifacts.iterdir()}
    return studies, files


def test_publishing_again_writes_nothing_and_attaches_each_file_once(dashboard):
    _, out, url = dashboard
    before = _snapshot(url, out / "artifacts")
    for name, (_, _, note, metas) in before[0].items():
        assert [f for f, _ in metas] == sorted([*board.FIGURES, "summary.csv"]), name
        assert "| fathom |" in note and "| random |" in note, name
    assert len(before[1]) == len(before[0]) * (len(board.FIGURES) + 1)
    board.publish(url, "digits", out / "digits", out / "artifacts", tuners=TUNERS, seeds=[0])
    assert _snapshot(url, out / "artifacts") == before


def _run(name: str, evals: list[tuple[int, float]], run_rounds: int) -> record.RunRecord:
    """A run study in memory whose evaluations sit at the given cumulative rounds."""
    study = optuna.create_study(study_name=name, direction="maximize")
    record.write_header(
        study, task="demo", tuner=name.split("/")[1], seed=0, unit="run",
        target=Target("accuracy", 0.9), rounds_per_run=run_rounds, budget_rounds=100,
    )
    spent = 0
    while evals:
        here = [(r - spent, v) for r, v in evals if r <= spent + run_rounds]
        evals = evals[len(here):]
        t = study.ask()
        record.write_step(
            t,
            cost=Cost(rounds=run_rounds, examples=10 * run_rounds),
            evals=[record.evaluation(r, 10 * r, {"accuracy": v}) for r, v in here],
        )
        study.tell(t, here[-1][1])
        spent += run_rounds
    return record.read_run(study)


def test_grid_is_exact_and_coarsens_only_when_it_would_need_too_many_trials(monkeypatch):
    one = _run("demo/a/seed0", [(6, 0.1), (12, 0.4)], 12)
    other = _run("demo/b/seed0", [(6, 0.2), (10, 0.3), (16, 0.5), (20, 0.6)], 10)
    g = board.grid([one, other])
    assert g == (2, True)  # gcd(6, 12, 6, 10, 16, 20)
    trials = board.companion_trials(other, g)
    assert [(t.number, t.value) for t in trials if t.value is not None] == [(3, 0.2), (5, 0.3), (8, 0.5), (10, 0.6)]
    monkeypatch.setattr(board, "MAX_TRIALS", 0)
    monkeypatch.setattr(board, "MAX_FILL", 0)
    g = board.grid([one, other])
    assert g == (6, False)  # the commonest spacing between evaluations: 6 (twice)
    assert board.companion_name("demo/b/seed0", "accuracy", g) == "demo/b/seed0/val_accuracy by ~6 rounds"
    trials = board.companion_trials(other, g)
    # trial n: the last evaluation after more than 6(n-1) and at most 6n rounds
    assert [(t.number, t.value) for t in trials if t.value is not None] == [(1, 0.2), (2, 0.3), (3, 0.5), (4, 0.6)]
    assert [t.user_attrs["cum_rounds"] for t in trials if t.value is not None] == [6, 10, 16, 20]


def _history_points(dom: str) -> tuple[str, list[str], list[list[tuple[float, float]]]]:
    """The compare page's history plot: its y-axis title, its legend, and the marker
    positions (pixels) of each trace with markers, in drawing order."""
    svg = dom[dom.index('class="main-svg"') : dom.index("Cumulative Probability")]  # not the EDF plot
    title = re.findall(r'<text class="ytitle"[^>]*>([^<]*)<', svg)
    legend = re.findall(r'<text class="legendtext"[^>]*>([^<]*)<', svg)
    traces = []
    for body in re.split(r'<g class="trace scatter', svg)[1:]:
        points = re.findall(r'class="point" transform="translate\(([-\d.]+),([-\d.]+)\)"', body)
        if points:
            traces.append([(float(x), float(y)) for x, y in points])
    return title[0] if title else "", legend, traces


@needs_chromium
def test_compare_page_shows_fathom_and_a_baseline_on_one_axis_under_one_metric_name(dashboard, tmp_path):
    base, _, url = dashboard
    step, companions = _companions(url)
    ids = {s["study_name"]: s["study_id"] for s in json.loads(_get(f"{base}/api/studies")[1])["study_summaries"]}
    shown = [NAMES[0], NAMES[1]]  # FATHOM and random search
    query = ",".join(str(ids[companions[n].study_name]) for n in shown)
    dom = _render(f"{base}/dashboard/compare-studies?ids={query}", tmp_path / "profile")
    title, legend, traces = _history_points(dom)
    assert title == "val_accuracy" and "Objective 0" not in dom
    for n in shown:
        assert f"val_accuracy of {companions[n].study_name}" in legend
    # one marker trace per study, in the order selected, one marker per evaluation, every
    # marker at (cumulative rounds, validation accuracy) on the same two linear axes
    want = [_evaluations(optuna.load_study(study_name=n, storage=url)) for n in shown]
    assert [len(t) for t in traces] == [len(w) for w in want]
    px = np.array([p for t in traces for p in t])
    data = np.array([(r / step, v) for w in want for r, _, v in w])
    for axis in (0, 1):
        fit = np.polyfit(data[:, axis], px[:, axis], 1)
        assert abs(fit[0]) > 1e-3
        assert np.abs(np.polyval(fit, data[:, axis]) - px[:, axis]).max() < 1.0, axis


@needs_chromium
def test_every_study_shows_the_summary_table_and_the_figures(dashboard, tmp_path):
    base, out, _ = dashboard
    ids = {s["study_name"]: s["study_id"] for s in json.loads(_get(f"{base}/api/studies")[1])["study_summaries"]}
    dom = _render(f"{base}/dashboard/studies/{ids[NAMES[0]]}/note", tmp_path / "profile")
    summary = (out / "digits" / "summary.md").read_text()
    for tuner in TUNERS:
        row = next(ln for ln in summary.splitlines() if ln.startswith(f"| {tuner} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.search(r"<tr>\s*" + "".join(rf"<td[^>]*>{re.escape(c)}</td>\s*" for c in cells), dom), tuner
    tags = re.findall(r"<img [^>]*>", dom)
    images = {re.search(r'src="([^"]+)"', t)[1]: re.search(r'alt="([^"]+)"', t)[1] for t in tags}
    assert all(src.startswith("/artifacts/") for src in images)
    assert sorted(images.values()) == sorted(board.FIGURES)
    for src, name in images.items():
        with urllib.request.urlopen(f"{base}{src}", timeout=5) as r:
            assert r.headers["Content-Type"] == "image/png"
            assert r.read() == (out / "digits" / name).read_bytes()
