"""``python -m studies.compare`` and ``studies.report``: bad input, a tiny comparison, resume."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from studies import compare
from studies.report import markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]
TUNERS = ["fathom", "random", "tpe+hyperband"]
TINY = ["--rounds", "10", "--budget-rounds", "30", "--seeds", "0", "--no-progress"]


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _unwritable(tmp_path: pathlib.Path) -> pathlib.Path:
    if os.geteuid() == 0:  # root ignores permission bits; /proc accepts no new files
        return pathlib.Path("/proc/fathom_tune_compare_test/out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "nope"], "valid tasks: digits"),
        (["--tuners", "fathom", "bogus"], "valid tuners: fathom, fathom+server, fathom-auto, fedex, fedex-auto, fedhyper, fedhyper-cl, fedhyper-full, fedhyper-g, fedhyper-gm, fedhyper-sl, gp, grid, random"),
        (["--rounds", "10", "--budget-rounds", "9"], "smaller than one training run"),
        (["--budget-multiple", "0.5"], "smaller than one training run"),
        (["--seeds", "-1"], "--seeds must be distinct ints >= 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--out", "{file}"], "is a file, not a directory"),
        (["--out", "{file}/sub"], "is a file, not a directory"),
        (["--out", "{unwritable}"], "not writable"),
        (["--storage", "sqlite:///{file}/x.db"], "is a file, not a directory"),
        (["--starts", "default", "eta*3"], "--starts: unknown start(s) 'eta*3'; valid starts: default, eta/10, eta*10, B=4, B=256"),
        (["--starts", "B=4", "B=4"], "--starts lists a start twice"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    file = tmp_path / "a_file"
    file.write_text("x")
    unwritable = _unwritable(tmp_path)
    argv = [a.format(file=file, unwritable=unwritable) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert _listing(tmp_path) == before


def _rounds_to_target(study: optuna.Study) -> tuple[float, float]:
    """Independently of studies.report and fathom_tune.record: the whole tuning
    process's cost until the target, from the raw trial attributes."""
    attrs = study.user_attrs
    metric, value = f"val_{attrs['target_metric']}", attrs["target_value"]
    rounds = examples = 0
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.user_attrs.get("stale"):
            continue
        for e in t.user_attrs.get("evals", []):
            if e[metric] >= value:
                return rounds + e["rounds"], examples + e["examples"]
        rounds += t.user_attrs.get("cost", {}).get("rounds", 0)
        examples += t.user_attrs.get("cost", {}).get("examples", 0)
    return math.nan, math.nan


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    argv = [*TINY, "--tuners", *TUNERS, "--out", str(out)]
    assert compare.main(argv) == 0
    return out, argv


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_comparison_writes_report_from_storage(comparison):
    out, _ = comparison
    report_dir = out / "digits"
    report = (report_dir / "report.md").read_text()
    for name in (
        "best_vs_rounds.png",
        "best_vs_examples.png",
        "hparams_per_round.png",
        "rounds_to_target.png",
    ):
        assert f"]({name})" in report
        assert (report_dir / name).stat().st_size > 10_000
    assert (report_dir / "report.html").read_text().count("<img") == 4
    storage = optuna.storages.get_storage(f"sqlite:///{out / 'compare.db'}")
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    runs = ["digits/fathom/seed0", "digits/random/seed0", "digits/tpe+hyperband/seed0"]
    # each run and its companion study for the dashboard (studies.dashboard; evaluations every 5 rounds)
    assert names == sorted([*runs, *(f"{r}/val_accuracy by 5 rounds" for r in runs)])

    seeds = pd.read_csv(report_dir / "per_seed.csv")
    summary = pd.read_csv(report_dir / "summary.csv").set_index("tuner")
    shown = (report_dir / "summary.md").read_text()
    for tuner in TUNERS:
        study = optuna.load_study(study_name=f"digits/{tuner}/seed0", storage=storage)
        row = seeds[seeds["tuner"] == tuner].iloc[0]
        rounds, examples = _rounds_to_target(study)
        assert _same(row["rounds_to_target"], rounds), tuner
        assert _same(row["examples_to_target"], examples), tuner
        assert _same(summary.loc[tuner, "rounds_to_target_mean"], rounds)
        assert bool(row["reached"]) == (not math.isnan(rounds))
        assert row["test_accuracy"] == pytest.approx(study.user_attrs["test"]["accuracy"])
        spent = sum(t.user_attrs.get("cost", {}).get("rounds", 0) for t in study.trials)
        assert spent == 10 if tuner == "fathom" else spent <= 30
        assert row["total_rounds"] == spent
        assert summary.loc[tuner, "total_rounds_mean"] == spent
        line = next(ln for ln in shown.splitlines() if ln.startswith(f"| {tuner} |"))
        assert f"| {spent} |" in line
        assert f"| {tuner} | 0 |" in markdown_table(seeds)
    assert "## Environment" in report and "JAX backend" in report


def test_rerun_resumes_without_new_trials(comparison):
    out, argv = comparison
    storage = optuna.storages.get_storage(f"sqlite:///{out / 'compare.db'}")

    def snapshot():
        return {
            s.study_name: (s.n_trials, s.datetime_start)
            for s in optuna.get_all_study_summaries(storage)
        }

    before = snapshot()
    assert compare.main(argv) == 0
    assert snapshot() == before


def test_other_run_length_in_same_storage_is_refused(comparison, capsys):
    out, argv = comparison
    before = _listing(out)
    argv = [*argv, "--rounds", "12"]  # the later --rounds wins
    assert compare.main(argv) == 2
    assert "holds runs of 10 rounds" in capsys.readouterr().err
    assert _listing(out) == before


def test_partial_fathom_study_is_run_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'compare.db'}"
    partial = optuna.create_study(study_name="digits/fathom/seed0", storage=url)
    for _ in range(3):
        partial.enqueue_trial({"learning_rate": 0.1})
        partial.optimize(lambda t: t.suggest_float("learning_rate", 0.01, 1.0), n_trials=1)
    argv = [
        "--rounds",
        "6",
        "--seeds",
        "0",
        "--tuners",
        "fathom",
        "--no-progress",
        "--storage",
        url,
        "--out",
        str(tmp_path),
    ]
    assert compare.main(argv) == 0
    study = optuna.load_study(study_name="digits/fathom/seed0", storage=url)
    assert len(study.trials) == 6
    assert "accuracy" in study.user_attrs["test"]
    assert set(study.trials[0].params) == {"learning_rate", "local_epochs", "batch_size"}
    assert (tmp_path / "digits" / "report.md").exists()


def _handmade(storage) -> None:
    """A one-run study (one trial per round) and a search study (two runs of 4 rounds),
    written through the run record as any tuner would."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from fathom_tune import Cost, HParams, Target, record

    dist = {"learning_rate": FloatDistribution(1e-4, 10.0, log=True)}
    target = Target("accuracy", 0.9)
    one = optuna.create_study(study_name="toy/fathom/seed0", storage=storage)
    record.write_header(
        one, task="toy", tuner="fathom", seed=0, unit="round", target=target, rounds_per_run=4, budget_rounds=4
    )
    for r, val in enumerate([None, 0.5, None, 0.95]):
        examples = 10 * (r + 1)
        evals = [] if val is None else [record.evaluation(1, examples, {"accuracy": val})]
        user = {"round": r, "local_steps": 1, "cost": Cost(rounds=1, examples=examples).as_dict(), "evals": evals}
        one.add_trial(create_trial(params={"learning_rate": 0.1}, distributions=dist, value=1.0, user_attrs=user))
    record.write_outcome(
        one, hparams=HParams(0.1, 1.0, 10.0), validation={"accuracy": 0.95}, test={"accuracy": 0.8},
        ledger=Cost(rounds=4, examples=100),
    )
    base = optuna.create_study(study_name="toy/random/seed0", storage=storage, direction="maximize")
    record.write_header(
        base, task="toy", tuner="random", seed=0, unit="run", target=target, rounds_per_run=4, budget_rounds=8
    )
    runs = [  # (state, evals as (rounds, examples, accuracy), ledger rounds/examples)
        (TrialState.PRUNED, [(2, 100, 0.3)], (2, 100)),
        (TrialState.COMPLETE, [(2, 70, 0.6), (4, 150, 0.92)], (4, 150)),
    ]
    for state, evals, (rounds, examples) in runs:
        spent = Cost(rounds=rounds, examples=examples, steps=1, bytes_down=1, bytes_up=1, seconds=0.5)
        base.add_trial(
            create_trial(
                state=state,
                params={"learning_rate": 0.1},
                distributions=dist,
                value=evals[-1][2] if state == TrialState.COMPLETE else None,
                intermediate_values={r: a for r, _, a in evals},
                user_attrs={
                    "cost": spent.as_dict(),
                    "evals": [record.evaluation(r, e, {"accuracy": a}) for r, e, a in evals],
                },
            )
        )
    record.write_outcome(
        base, hparams=HParams(0.1, 1.0, 10.0), validation={"accuracy": 0.92}, test={"accuracy": 0.85},
        ledger=Cost(rounds=6, examples=250, steps=2, bytes_down=2, bytes_up=2, seconds=1.0),
    )


def test_report_cost_to_target_counts_every_earlier_trial(tmp_path):
    from studies.report import build_report

    url = f"sqlite:///{tmp_path / 'toy.db'}"
    _handmade(url)
    build_report(url, "toy", tmp_path / "out")
    seeds = pd.read_csv(tmp_path / "out" / "per_seed.csv").set_index("tuner")
    # FATHOM: round 4 (the 4th trial) is the first evaluation >= 0.9; examples 10+20+30+40.
    assert seeds.loc["fathom", ["rounds_to_target", "examples_to_target"]].tolist() == [4, 100]
    # random: the pruned run's 2 rounds / 100 examples, then 4 rounds / 150 examples.
    assert seeds.loc["random", ["rounds_to_target", "examples_to_target"]].tolist() == [6, 250]
    assert seeds.loc["random", "test_accuracy"] == 0.85
    assert seeds.loc["random", "val_accuracy"] == 0.92
    assert seeds.loc["random", "total_rounds"] == 6
    for tuner in ("fathom", "random"):
        study = optuna.load_study(study_name=f"toy/{tuner}/seed0", storage=url)
        assert (
            list(_rounds_to_target(study))
            == seeds.loc[tuner, ["rounds_to_target", "examples_to_target"]].tolist()
        )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| random | 1 | 0/1 | 6 | 250 | 0.85 | 6 |" in summary


def test_a_user_registered_tuner_shows_up_in_the_report(tmp_path, monkeypatch):
    # Two tuners registered in a few lines, with no change to studies/: a FATHOM
    # variant and a search baseline of Optuna's pieces.
    import baselines
    import fathom_tune
    from fathom_tune.fathom import Fathom

    # the registry as it was, after the test (other tests list the registered names)
    from fathom_tune.tuning import registry

    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))

    fast = Fathom(name="fathom-fast", config=fathom_tune.FathomConfig(gamma_learning_rate=0.05))
    sha2 = baselines.Baseline("tpe+sha2", baselines.TPE(), baselines.SuccessiveHalving(reduction_factor=2))
    for tuner in (fast, sha2):
        fathom_tune.tuners.register(tuner, replace=True)
    argv = ["--rounds", "4", "--budget-rounds", "8", "--seeds", "0", "--no-progress"]
    assert compare.main([*argv, "--tuners", "fathom-fast", "tpe+sha2", "--out", str(tmp_path)]) == 0
    seeds = pd.read_csv(tmp_path / "digits" / "per_seed.csv").set_index("tuner")
    assert sorted(seeds.index) == ["fathom-fast", "tpe+sha2"]
    assert seeds.loc["fathom-fast", "total_rounds"] == 4 and seeds.loc["tpe+sha2", "total_rounds"] <= 8
    report = (tmp_path / "digits" / "report.md").read_text()
    assert "gamma_learning_rate=0.05" in report and "SuccessiveHalving(reduction_factor=2" in report
    with pytest.raises(ValueError, match="already registered"):
        fathom_tune.tuners.register(Fathom(name="tpe+sha2"))


def test_a_second_comparison_on_the_same_out_is_refused(tmp_path, capsys):
    from fathom_tune.storage.checkpoint import exclusive

    with exclusive(tmp_path / "compare", what="--out"):
        assert compare.main([*TINY, "--tuners", "fathom", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out='{tmp_path / 'compare'}' is in use by another running process" in err
    assert not (tmp_path / "compare.db").exists()


def test_an_interrupt_between_studies_changes_nothing(comparison, tmp_path, monkeypatch, capsys):
    # The module's comparison, run again into another folder and stopped by Ctrl-C
    # right after its second study: one line, status 130, and the re-run ends with
    # the same tables as the comparison that was never interrupted.
    once, argv = comparison
    argv = [*argv, "--out", str(tmp_path)]  # the later --out wins
    real, calls = compare._run_tuner, []

    def stop_after_the_second(*args, **kwargs):
        line = real(*args, **kwargs)
        calls.append(line)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(compare, "_run_tuner", stop_after_the_second)
    assert compare.main(argv) == 130
    assert capsys.readouterr().err.strip().endswith("run the same command again to continue")
    monkeypatch.setattr(compare, "_run_tuner", real)
    assert compare.main(argv) == 0
    drop = ["total_seconds", "total_compile_seconds"]
    for name in ("per_seed.csv", "curves.csv"):
        got = pd.read_csv(tmp_path / "digits" / name).drop(columns=drop, errors="ignore")
        want = pd.read_csv(once / "digits" / name).drop(columns=drop, errors="ignore")
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("module", ["studies.compare", "studies.fathom", "studies.paper_claims"])
def test_help_answers_without_importing_jax(module):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('JAX' if 'jax' in sys.modules else 'no JAX')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m " in proc.stdout and proc.stdout.strip().endswith("no JAX")


def test_the_command_lines_know_every_built_in_task():
    import fathom_tune
    from studies._cli import TASKS

    assert sorted(TASKS) == sorted(fathom_tune.tasks.REGISTRY)


def test_the_comparison_shows_no_line_per_round(tmp_path, caplog):
    """The tuners' messages (started, resumed, ...) are shown; FATHOM's per-round lines,
    which python -m studies.fathom prints under a header, are not."""
    caplog.set_level(logging.DEBUG)
    assert compare.main([*TINY, "--tuners", "fathom", "--out", str(tmp_path)]) == 0
    names = {r.name for r in caplog.records if r.levelno >= logging.INFO}
    assert "fathom_tune.fathom.optimize" in names  # "FATHOM ...: started at round 0 of 10"
    assert "fathom_tune.rounds" not in names
