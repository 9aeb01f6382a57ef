"""``python -m studies.compare --starts``: every tuner and static FedAvg from each start, one
storage, and the report's "versus not tuning" table and figure."""

from __future__ import annotations

import itertools
import math

import optuna
import pandas as pd
import pytest
from _toy import toy_task
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

import fathom_tune
from fathom_tune import Cost, HParams, Target, record
from studies import compare, figures, peers, starts
from studies.report import build_report

STARTS = ["default", "eta*10", "B=4"]
TUNERS = ["fathom", "fedex"]
ROUNDS = 6


def _toy():
    return toy_task()


@pytest.fixture(scope="module")
def from_starts(tmp_path_factory):
    out = tmp_path_factory.mktemp("starts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fathom_tune.tasks.REGISTRY, "toy", _toy)
        argv = ["--task", "toy", "--starts", *STARTS, "--tuners", *TUNERS, "--seeds", "0",
                "--rounds", str(ROUNDS), "--no-progress", "--out", str(out)]
        assert compare.main(argv) == 0
    return out


def _task():
    return _toy().replace(num_rounds=ROUNDS, eval_every=min(2, ROUNDS))


def _raw_rounds_to_target(study: optuna.Study) -> float:
    """From the raw trial attributes, independently of the report and the reader."""
    attrs = study.user_attrs
    col, rounds = f"val_{attrs['target_metric']}", 0
    for t in sorted(study.trials, key=lambda t: t.number):
        for e in t.user_attrs.get("evals", []):
            if e[col] >= attrs["target_value"]:
                return rounds + e["rounds"]
        rounds += t.user_attrs.get("cost", {}).get("rounds", 0)
    return math.nan


def test_one_study_per_start_tuner_and_seed_plus_static_fedavg(from_starts):
    storage = optuna.storages.get_storage(f"sqlite:///{from_starts / 'compare.db'}")
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    runs = {n for n in names if "/val_" not in n}  # the dashboard's companion studies apart
    want = {f"toy{suffix}/{t}/seed0" for suffix in ("", "@eta*10", "@B=4") for t in ["fedavg", *TUNERS]}
    assert runs == want
    assert {n.rsplit("/val_", 1)[0] for n in names - runs} == want
    task = _task()
    for label, suffix in (("default", ""), ("eta*10", "@eta*10"), ("B=4", "@B=4")):
        start = starts.starts(task)[label]
        static = optuna.load_study(study_name=f"toy{suffix}/fedavg/seed0", storage=storage)
        assert static.user_attrs["tuner"] == "fedavg" and static.user_attrs["unit"] == "round"
        assert static.user_attrs["hparams"] == start.as_dict()
        assert len(static.trials) == ROUNDS and all(t.params == start.as_dict() for t in static.trials)
        fathom = optuna.load_study(study_name=f"toy{suffix}/fathom/seed0", storage=storage)
        assert fathom.trials[0].params == pytest.approx(start.as_dict())  # FATHOM's round 0: the start


def test_the_versus_table_reads_the_storage_and_matches_fedavg_run_directly(from_starts):
    report = from_starts / "toy"
    table = pd.read_csv(report / "versus.csv", keep_default_na=False, na_values=[""])
    assert list(zip(table["start"], table["tuner"])) == list(itertools.product(STARTS, TUNERS))
    storage = optuna.storages.get_storage(f"sqlite:///{from_starts / 'compare.db'}")
    task = _task()
    for label in STARTS:
        # static FedAvg run again here, from the start, on the same seed: the same numbers
        direct = fathom_tune.fedavg(task.replace(init_hparams=starts.starts(task)[label]), seed=0)
        rows = table[table["start"] == label]
        assert rows["static test accuracy"].tolist() == pytest.approx([direct.test_metrics["accuracy"]] * 2)
        hit = direct.rounds_to_target
        assert (rows["static reached"] == ("1/1" if hit else "0/1")).all()
        assert rows["static rounds to target"].tolist() == [str(hit) if hit else "never"] * 2
        for tuner in TUNERS:
            study = optuna.load_study(study_name=f"{starts.study_task('toy', label)}/{tuner}/seed0", storage=storage)
            row = rows[rows["tuner"] == tuner].iloc[0]
            assert row["test accuracy"] == pytest.approx(study.user_attrs["test"]["accuracy"])
            raw = _raw_rounds_to_target(study)
            assert row["rounds to target"] == ("never" if math.isnan(raw) else f"{raw:g}")
            worse = direct.test_metrics["accuracy"] - study.user_attrs["test"]["accuracy"]
            missed = bool(hit) and math.isnan(raw)
            assert bool(row["loss_test"]) == (worse > 0.01) and bool(row["loss_target"]) == missed
            assert (isinstance(row["loss"], str) and row["loss"] != "") == (worse > 0.01 or missed)
    md = (report / "report.md").read_text()
    assert "## Versus not tuning" in md and "](versus_static.png)" in md
    assert (report / "versus_static.png").stat().st_size > 10_000
    per_seed = pd.read_csv(report / "per_seed.csv")  # the default start's runs, static FedAvg among them
    assert sorted(per_seed["tuner"]) == sorted(["fedavg", *TUNERS])


def _one_run_study(storage, task: str, tuner: str, accuracies, test: float) -> None:
    """A one-run study of 4 rounds (evaluations after rounds 2 and 4), written as a tuner would."""
    dist = {"learning_rate": FloatDistribution(1e-4, 10.0, log=True)}
    study = optuna.create_study(study_name=f"{task}/{tuner}/seed0", storage=storage)
    record.write_header(study, task=task, tuner=tuner, seed=0, unit="round", target=Target("accuracy", 0.9),
                        rounds_per_run=4, budget_rounds=4)
    for r in range(4):
        evals = [record.evaluation(1, 10, {"accuracy": accuracies[r // 2]})] if r % 2 else []
        user = {"round": r, "cost": Cost(rounds=1, examples=10).as_dict(), "evals": evals}
        study.add_trial(create_trial(params={"learning_rate": 0.1}, distributions=dist, value=1.0, user_attrs=user))
    record.write_outcome(study, hparams=HParams(0.1, 1.0, 10.0), validation={"accuracy": accuracies[-1]},
                         test={"accuracy": test}, ledger=Cost(rounds=4, examples=40))


def test_a_loss_is_flagged_in_the_report(tmp_path):
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    _one_run_study(url, "toy", "fedavg", [0.5, 0.95], test=0.85)
    _one_run_study(url, "toy", "close", [0.92, 0.95], test=0.845)  # 0.5 points below: no loss
    _one_run_study(url, "toy", "worse", [0.92, 0.95], test=0.83)  # 2 points below
    _one_run_study(url, "toy", "missed", [0.5, 0.6], test=0.86)  # static reached, it did not
    _one_run_study(url, "toy@B=4", "fedavg", [0.5, 0.6], test=0.5)
    _one_run_study(url, "toy@B=4", "close", [0.5, 0.6], test=0.7)
    build_report(url, "toy", tmp_path / "out", starts=["default", "B=4"])
    table = pd.read_csv(tmp_path / "out" / "versus.csv", keep_default_na=False).set_index(["start", "tuner"])
    assert table.loc[("default", "close"), "loss"] == ""
    assert table.loc[("default", "worse"), "loss"] == "test accuracy 2.0 points worse than static FedAvg's"
    assert table.loc[("default", "missed"), "loss"] == (
        "static reached the target, the tuner did not (seed 0)"
    )
    assert table.loc[("default", "close"), "rounds to target"] == "2"
    assert table.loc[("default", "close"), "static rounds to target"] == "4"
    assert table.loc[("B=4", "close"), "loss"] == "" and table.loc[("B=4", "close"), "reached"] == "0/1"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| default | worse | 1/1 | 2 | 0.83 | 1/1 | 4 | 0.85 | LOSS: test accuracy 2.0 points" in md
    assert "Losses: 2 of 4 rows." in md


def _texts_overlap(fig) -> list[str]:
    import matplotlib.text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = set()  # tick labels of ticks outside the view limits are not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo):
                    hidden |= {id(tick.label1), id(tick.label2)}
    texts = [t for t in fig.findobj(matplotlib.text.Text)
             if t.get_visible() and t.get_text().strip() and id(t) not in hidden]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    problems = [f"{a!r} overlaps {b!r}" for (a, x), (b, y) in itertools.combinations(boxes, 2) if x.overlaps(y)]
    problems += [f"{a!r} leaves the figure" for a, x in boxes if not fig.bbox.contains(x.x0, x.y0)
                 or not fig.bbox.contains(x.x1, x.y1)]
    problems += [f"{t.get_text()!r} is set in {t.get_fontsize()} pt" for t in texts if t.get_fontsize() < 8]
    return problems


def test_the_versus_figure_has_no_overlapping_labels(tmp_path):
    names = ["fathom", "fathom+server", "fedex", "fedhyper-full", "a-long-user-tuner-name"]
    rows = []
    for i, (start, tuner) in enumerate(itertools.product(starts.STARTS, names)):
        reached = i % 4 != 0
        rows.append({"start": start, "tuner": tuner, "test accuracy": 0.5 + 0.01 * (i % 7),
                     "static test accuracy": 0.55, "loss_test": i % 3 == 0, "loss_target": i % 5 == 0,
                     "rounds_to_target_mean": 20.0 + i if reached else math.nan,
                     "static_rounds_to_target_mean": math.nan if start == "B=4" else 40.0})
    table = pd.DataFrame(rows)
    fig = figures.versus_figure(table, Target("accuracy", 0.9), 150, "fedavg")
    assert _texts_overlap(fig) == []
    figures.versus_static(table, Target("accuracy", 0.9), 150, "fedavg", tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 10_000


def test_the_run_figure_has_no_overlapping_labels(from_starts):
    table = pd.read_csv(from_starts / "toy" / "versus.csv", keep_default_na=False, na_values=[""])
    assert _texts_overlap(figures.versus_figure(table, Target("accuracy", 0.8), ROUNDS, "fedavg")) == []


def test_without_starts_the_plan_is_todays():
    args = compare.parse_args(["--quick", "--out", "/tmp/unused-by-parse"])
    plan = [record.study_name(task.name, tuner, seed) for seed in args.seeds for _, task, tuner in compare._plan(args)]
    assert plan == [f"digits/{t}/seed{s}" for s in (0, 1) for t in compare.QUICK["tuners"]]
    assert args.runs == [(None, args.task_obj)] and args.task_obj.init_hparams == fathom_tune.tasks.digits().init_hparams


def test_with_starts_the_default_start_keeps_todays_names():
    args = compare.parse_args(["--starts", "default", "eta/10", "--tuners", "fathom", "fedavg", "--seeds", "0"])
    plan = [record.study_name(task.name, tuner, 0) for _, task, tuner in compare._plan(args)]
    assert plan == ["digits/fedavg/seed0", "digits/fathom/seed0",
                    "digits@eta*0.1/fedavg/seed0", "digits@eta*0.1/fathom/seed0"]
    low = args.runs[1][1]
    assert low.init_hparams.learning_rate == pytest.approx(args.task_obj.init_hparams.learning_rate / 10)


def test_starts_are_clipped_to_the_bounds():
    task = _toy().replace(bounds=fathom_tune.Bounds(HParams(1e-4, 0.01, 2.0), HParams(0.5, 10.0, 64.0)))
    got = starts.starts(task)
    assert got["eta*10"].learning_rate == 0.5 and got["B=256"].batch_size == 64.0 and got["B=4"].batch_size == 4.0


def test_peers_is_compare_with_starts():
    argv = peers.compare_argv(["--tasks", "digits", "synthetic", "--seeds", "0", "--rounds", "5", "--out", "o"])
    tail = ["--tuners", *peers.TUNERS, "--seeds", "0", "--rounds", "5", "--out", "o", "--no-progress"]
    assert argv == [["--task", t, "--starts", *starts.STARTS, *tail] for t in ("digits", "synthetic")]
    args = compare.parse_args(argv[0])
    assert args.starts == list(starts.STARTS) and "fedavg" not in args.tuners
