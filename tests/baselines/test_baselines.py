import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import optuna
import pytest
from _toy import toy_task
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import baselines
import fathom_tune
from baselines import REGISTRY
from fathom_tune import Bounds, HParams, Target, fedavg, record

optuna.logging.set_verbosity(optuna.logging.ERROR)

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUNDS = 4  # rounds per trial of the toy task here
# Batch sizes 9..12 all pad to the bucket 12: one compiled program for every trial.
SPACE = Bounds(HParams(1e-3, 0.2, 9.0), HParams(1.0, 2.0, 12.0))
SAMPLERS = {
    baselines.Grid: optuna.samplers.GridSampler,
    baselines.Random: optuna.samplers.RandomSampler,
    baselines.TPE: optuna.samplers.TPESampler,
    baselines.GP: optuna.samplers.GPSampler,
}
PRUNERS = {
    None: optuna.pruners.NopPruner,
    baselines.Hyperband: optuna.pruners.HyperbandPruner,
    baselines.SuccessiveHalving: optuna.pruners.SuccessiveHalvingPruner,
    baselines.Median: optuna.pruners.MedianPruner,
}


def has_torch():
    try:
        baselines.GP.check_available()
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def task():
    # One task (one model object) for the module, so every trial shares compiled programs.
    return toy_task(num_rounds=ROUNDS, eval_every=1)


def journal_studies(path):
    if not os.path.exists(path):
        return []
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))
    ).get_all_studies()


def cost(trial):
    """What a trial recorded it spent (the run record's ``cost``)."""
    return record.step_cost(trial)


def trial_rounds(trial):
    return cost(trial).rounds


def total_cost(study):
    return sum((cost(t) for t in study.trials), fathom_tune.Cost())


# ------------------------------------------------------------------ every registry entry
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_baseline_runs_within_budget_and_records_its_ledger(task, name, tmp_path):
    budget = 5 * ROUNDS + 2
    baseline = REGISTRY[name]
    path = tmp_path / "study.journal"
    if isinstance(baseline.sampler, baselines.GP) and not has_torch():
        with pytest.raises(ImportError, match=r"fathom-tune\[gp\]"):
            baselines.run(
                task, name, budget_rounds=budget, storage=str(path), space=SPACE, progress=False
            )
        assert journal_studies(path) == []
        return
    out = baselines.run(
        task, name, budget_rounds=budget, seed=0, storage=str(path), space=SPACE, progress=False
    )
    study = optuna.load_study(
        study_name=f"toy/{name}/seed0", storage=fathom_tune.open_storage(str(path))
    )
    trials = study.trials
    # The right Optuna sampler and pruner, maximizing validation accuracy.
    assert isinstance(out.study.sampler.inner, SAMPLERS[type(baseline.sampler)])
    assert isinstance(out.study.pruner, PRUNERS[type(baseline.pruner) if baseline.pruner else None])
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    attrs = study.user_attrs
    assert (attrs["task"], attrs["tuner"], attrs["seed"]) == ("toy", name, 0)
    assert attrs["budget_rounds"] == budget and attrs["version"] == fathom_tune.__version__
    assert (attrs["target_metric"], attrs["target_value"], attrs["target_mode"]) == (
        "accuracy",
        0.8,
        "max",
    )
    # Budget: never exceeded; the study stopped only when a further full trial would not fit.
    spent = sum(trial_rounds(t) for t in trials)
    assert out.cost.rounds == spent <= budget
    assert budget - spent < ROUNDS
    assert len(trials) >= budget // ROUNDS
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        steps = sorted(t.intermediate_values)
        # One report per evaluation round (eval_every=1), the ledger's rounds match them.
        assert steps == list(range(1, trial_rounds(t) + 1))
        assert [e["rounds"] for e in t.user_attrs["evals"]] == steps
        assert cost(t).examples > 0 and cost(t).bytes_up > 0
        if t.state == TrialState.COMPLETE:
            assert trial_rounds(t) == ROUNDS and t.value == t.intermediate_values[ROUNDS]
        else:
            assert trial_rounds(t) < ROUNDS
        # The shared search space: FATHOM's three names, log scale, within the space.
        assert set(t.distributions) == {"learning_rate", "local_epochs", "batch_size"}
        assert all(isinstance(d, FloatDistribution) and d.log for d in t.distributions.values())
        assert SPACE.contains(HParams(**t.params))
    # Ledger totals and history cover every trial.
    assert list(out.history["number"]) == [t.number for t in trials]
    assert out.history["cum_rounds"].iloc[-1] == spent
    assert out.cost.examples == sum(cost(t).examples for t in trials)
    # The chosen configuration is the validation argmax among completed trials.
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: (t.value, -t.number))
    assert out.validation_metrics["accuracy"] == best.value
    assert out.hparams == HParams(**best.params)
    assert out.test_metrics == best.user_attrs["test"] == attrs["test"]
    assert attrs["chosen_trial"] == best.number
    assert out.params is not None  # this call ran the chosen trial


def test_grid_points_are_log_spaced_cell_centres_within_the_bounds(task):
    grid = baselines.Grid()
    values = grid.values(task.bounds)
    assert grid.max_trials() == 24 == math.prod(len(v) for v in values.values())
    lr = values["learning_rate"]  # bounds [1e-4, 10]: 4 cells of 1.25 decades each
    assert np.allclose(np.log10(lr), [-3.375, -2.125, -0.875, 0.375])
    assert np.allclose(values["batch_size"], [2 ** (4 / 3), 16.0, 2 ** (20 / 3)])
    for name, vals in values.items():
        assert getattr(task.bounds.lower, name) < min(vals) and max(vals) < getattr(
            task.bounds.upper, name
        )


# ------------------------------------------------------------------ pruning
def test_pruned_trial_is_pruned_in_the_study_with_its_partial_ledger(task):
    class PruneAtTwo(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1 and trial.last_step == 2

    study = optuna.create_study(direction="maximize", pruner=PruneAtTwo())
    study.optimize(baselines.Objective(task, seed=0, space=SPACE), n_trials=2)
    full, pruned = study.trials
    assert full.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
    assert cost(pruned).rounds == 2 and sorted(pruned.intermediate_values) == [1, 2]
    assert [e["rounds"] for e in pruned.user_attrs["evals"]] == [1, 2]
    # Its partial ledger is the first two rounds of the same configuration run in full.
    hp = HParams(**pruned.params)
    ref = fedavg(task, hp, seed=0, num_rounds=2, eval_every=1)
    assert cost(pruned).examples == ref.cost.examples
    assert pruned.intermediate_values[2] == pytest.approx(ref.validation_metrics["accuracy"])
    assert total_cost(study).rounds == ROUNDS + 2
    assert record.TEST not in pruned.user_attrs  # never a candidate


def test_pruned_variants_prune_and_count_partial_rounds(task):
    wide = Bounds(HParams(1e-4, 0.2, 9.0), HParams(1.0, 2.0, 12.0))
    # seed 1 draws several runs far worse than the median, which the pruner stops
    out = baselines.run(task, "random+median", budget_rounds=40, seed=1, space=wide, progress=False)
    states = out.history["state"]
    pruned = out.history[states == "PRUNED"]
    assert len(pruned) >= 1
    assert (pruned["rounds"] < ROUNDS).all() and (pruned["rounds"] >= 1).all()
    assert out.cost.rounds == out.history["rounds"].sum() <= 40
    # Pruning frees budget: more trials ran than 40 // ROUNDS full ones.
    assert len(out.history) > 40 // ROUNDS


# ------------------------------------------------------------------ budget in examples
def test_projected_cost_is_the_exact_cost_of_a_full_run(task):
    for hp in (HParams(0.1, 1.0, 10.0), HParams(0.5, 0.3, 9.0), HParams(0.01, 1.7, 12.0)):
        ref = fedavg(task, hp, seed=3)
        proj = baselines.projected_cost(task, hp, seed=3)
        assert (proj.rounds, proj.examples, proj.steps) == (
            ref.cost.rounds,
            ref.cost.examples,
            ref.cost.steps,
        )


def test_examples_budget_is_never_exceeded_and_a_refused_trial_costs_nothing(task):
    # A full trial in SPACE costs 159..1602 examples here: 3000 admits a few, then (with
    # seed 1's draws) refuses one whose full cost no longer fits.
    out = baselines.run(
        task, "random", budget_rounds=100, budget_examples=3000, seed=1, space=SPACE, progress=False
    )
    trials = out.study.trials
    assert out.cost.examples <= 3000
    refused = [t for t in trials if record.NOT_RUN in t.user_attrs]
    ran = [t for t in trials if t not in refused]
    assert len(refused) == 1 and refused[0].state == TrialState.FAIL
    assert cost(refused[0]).rounds == 0 and refused[0] is trials[-1]
    # It was refused because its own full cost did not fit into what was left.
    need = baselines.projected_cost(task, HParams(**refused[0].params), seed=1).examples
    assert out.cost.examples + need > 3000
    assert all(t.state == TrialState.COMPLETE for t in ran)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "bayes"}, ValueError, "valid names: .*'grid'.*'random'.*'tpe\\+hyperband'"),
        ({"budget_rounds": ROUNDS - 1}, ValueError, "budget_rounds=3 is smaller than one trial"),
        ({"budget_rounds": 0}, ValueError, "budget_rounds must be >= 1"),
        ({"budget_examples": 10}, ValueError, "budget_examples=10 is smaller than the cheapest"),
        (
            {"space": Bounds(HParams(1e-5, 0.2, 9.0), HParams(1.0, 2.0, 12.0))},
            ValueError,
            "space.lower=.*outside the bounds of task 'toy'",
        ),
        ({"space": "wide"}, TypeError, "space must be a fathom_tune.Bounds"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    ],
)
def test_bad_input_raises_and_writes_nothing(task, tmp_path, kwargs, error, match):
    path = tmp_path / "study.journal"
    args = {
        "name": "random",
        "budget_rounds": 20,
        "seed": 0,
        "space": SPACE,
        "storage": str(path),
        "progress": False,
    }
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(error, match=match):
        baselines.run(task, name, **args)
    assert not path.exists()
    # Also into an existing storage: no study is created.
    storage = fathom_tune.open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(error, match=match):
        baselines.run(task, name, **{**args, "storage": storage})
    assert storage.get_all_studies() == []


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError) as err:
        baselines.get("hyperband")
    for name in REGISTRY:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "storage, error, match",
    [
        ("sqlite:////nonexistent-folder/x/study.db", ValueError, "storage='sqlite:////nonexistent"),
        ("/nonexistent-folder/x/study.journal", ValueError, "does not exist"),
        (42, TypeError, "storage must be None"),
    ],
)
def test_unopenable_storage_is_a_clear_error(task, storage, error, match):
    with pytest.raises(error, match=match):
        baselines.run(
            task, "random", budget_rounds=20, storage=storage, space=SPACE, progress=False
        )
    assert not os.path.exists("/nonexistent-folder")


# ------------------------------------------------------------------ storage is the record
def add_trial(study, state, value, rounds, evals, test=None, params=(0.1, 1.0, 10.0)):
    dists = {
        n: FloatDistribution(getattr(SPACE.lower, n), getattr(SPACE.upper, n), log=True)
        for n in ("learning_rate", "local_epochs", "batch_size")
    }
    spent = fathom_tune.Cost(rounds=rounds, examples=sum(e["examples"] for e in evals[-1:]))
    attrs = {record.COST: spent.as_dict(), record.EVALS: evals}
    if test is not None:
        attrs[record.TEST] = {"accuracy": test}
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=value if state == TrialState.COMPLETE else None,
            params=dict(zip(dists, params)),
            distributions=dists,
            user_attrs=attrs,
            intermediate_values={e["rounds"]: e["val_accuracy"] for e in evals},
        )
    )


def evals(*pairs):
    return [{"rounds": r, "examples": 25 * r, "val_accuracy": v} for r, v in pairs]


def test_selection_reads_validation_only_and_resume_runs_nothing_past_the_budget(task, tmp_path):
    path = str(tmp_path / "study.journal")
    study = optuna.create_study(
        study_name="toy/random/seed0", storage=fathom_tune.open_storage(path), direction="maximize"
    )
    # Validation ranks trial 1 first; test would rank trial 0 (and 2) higher.
    add_trial(
        study,
        TrialState.COMPLETE,
        0.6,
        4,
        evals((2, 0.5), (4, 0.6)),
        test=0.95,
        params=(0.01, 1, 10),
    )
    add_trial(
        study,
        TrialState.COMPLETE,
        0.7,
        4,
        evals((2, 0.6), (4, 0.7)),
        test=0.50,
        params=(0.2, 1, 11),
    )
    add_trial(study, TrialState.PRUNED, None, 2, evals((2, 0.9)), params=(0.3, 1, 11))
    out = baselines.run(task, "random", budget_rounds=11, storage=path, space=SPACE, progress=False)
    assert len(out.study.trials) == 3  # 10 rounds spent; a fourth full trial would need 14
    assert out.study.user_attrs[record.CHOSEN_TRIAL] == 1 and out.hparams.learning_rate == 0.2
    assert out.validation_metrics == {"accuracy": 0.7} and out.test_metrics == {"accuracy": 0.50}
    assert out.params is None  # run by someone else
    assert out.cost.rounds == 10


def test_a_loss_target_is_minimized_and_the_lowest_loss_chosen(task):
    task = task.replace(num_rounds=2, target=Target("loss", 0.5, "min"))
    out = baselines.run(task, "random", budget_rounds=6, space=SPACE, progress=False)
    assert out.study.direction == optuna.study.StudyDirection.MINIMIZE
    values = [t.value for t in out.study.trials]
    assert len(values) == 3 and out.validation_metrics["loss"] == min(values) < max(values)
    chosen = out.study.trials[out.study.user_attrs[record.CHOSEN_TRIAL]]
    assert chosen.user_attrs["evals"][-1]["val_loss"] == out.validation_metrics["loss"]


def test_rounds_to_target_over_the_whole_tuning_from_storage(task, tmp_path):
    study = optuna.create_study(direction="maximize")
    record.write_header(
        study, task="toy", tuner="random", seed=0, unit="run", target=Target("accuracy", 0.8),
        rounds_per_run=4, budget_rounds=20,
    )
    add_trial(study, TrialState.COMPLETE, 0.7, 4, evals((1, 0.3), (2, 0.5), (3, 0.6), (4, 0.7)))
    add_trial(study, TrialState.PRUNED, None, 2, evals((1, 0.2), (2, 0.3)))
    add_trial(study, TrialState.COMPLETE, 0.9, 4, evals((1, 0.5), (2, 0.7), (3, 0.85), (4, 0.9)))
    add_trial(study, TrialState.COMPLETE, 0.95, 4, evals((1, 0.9), (2, 0.9), (3, 0.9), (4, 0.95)))
    # 4 rounds (trial 0) + 2 (pruned trial 1) + 3 (trial 2 first meets 0.8 at its round 3).
    run_ = record.read_run(study)
    assert run_.cost_to_target() == (4 + 2 + 3, 100 + 50 + 75)
    assert run_.cost_to_target(Target("accuracy", 0.99)) == (None, None)
    assert run_.ledger.rounds == 14 and run_.spent_steps == 4


def test_rounds_to_target_of_a_real_run_is_the_hand_computed_sum(task, tmp_path):
    task = task.replace(target=Target("accuracy", 0.45))
    path = str(tmp_path / "study.journal")
    out = baselines.run(
        task, "random", budget_rounds=6 * ROUNDS, storage=path, space=SPACE, progress=False
    )
    study = optuna.load_study(study_name="toy/random/seed0", storage=fathom_tune.open_storage(path))
    rounds = examples = 0
    expected = (None, None)
    for t in sorted(study.trials, key=lambda t: t.number):
        hit = [e for e in t.user_attrs["evals"] if e["val_accuracy"] >= 0.45]
        if hit:
            expected = (rounds + hit[0]["rounds"], examples + hit[0]["examples"])
            break
        rounds += cost(t).rounds
        examples += cost(t).examples
    assert expected[0] is not None and expected[0] > ROUNDS  # not the first trial
    assert (
        (out.rounds_to_target, out.examples_to_target)
        == expected
        == record.read_run(study).cost_to_target()
    )


def test_resume_continues_the_study_with_fresh_draws(task, tmp_path):
    path = str(tmp_path / "study.journal")
    first = baselines.run(
        task, "random", budget_rounds=2 * ROUNDS, storage=path, space=SPACE, progress=False
    )
    again = baselines.run(
        task, "random", budget_rounds=2 * ROUNDS, storage=path, space=SPACE, progress=False
    )
    assert len(first.study.trials) == len(again.study.trials) == 2
    more = baselines.run(
        task, "random", budget_rounds=4 * ROUNDS, storage=path, space=SPACE, progress=False
    )
    params = [tuple(t.params.values()) for t in more.study.trials]
    assert (
        len(params) == 4 and len(set(params)) == 4
    )  # the resumed worker does not redraw trials 0, 1
    assert more.cost.rounds == 4 * ROUNDS


# ------------------------------------------------------------------ parallel workers
WORKER = """
import os, sys, time
sys.path.insert(0, "tests")
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
import baselines
from fathom_tune import Bounds, HParams
from fathom_tune.engine import Engine
from fathom_tune import fedavg
from _toy import toy_task
path, budget, worker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
task = toy_task(num_rounds=2, eval_every=1)
fedavg(task, HParams(0.1, 1.0, 10.0), num_rounds=1)  # compile first, then start together
run_round = Engine.run_round  # and slow rounds down so that the workers' trials interleave
Engine.run_round = lambda self, *args: (time.sleep(0.02), run_round(self, *args))[1]
open(f"{path}.ready{worker}", "w").close()
deadline = time.time() + 120
while not all(os.path.exists(f"{path}.ready{k}") for k in (0, 1)) and time.time() < deadline:
    time.sleep(0.01)
space = Bounds(HParams(1e-3, 0.2, 9.0), HParams(1.0, 2.0, 12.0))
baselines.run(task, "grid", budget_rounds=budget, storage=path, space=space, worker=worker,
              progress=False)
"""


def test_two_workers_share_one_journal_without_duplicates_or_lost_trials(tmp_path):
    path = str(tmp_path / "study.journal")
    budget = 2 * 20  # 20 two-round trials, fewer than the grid's 24 points
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, path, str(budget), str(k)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for k in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    study = optuna.load_study(study_name="toy/grid/seed0", storage=fathom_tune.open_storage(path))
    trials = study.trials
    ran = [t for t in trials if t.state == TrialState.COMPLETE]
    refused = [t for t in trials if record.NOT_RUN in t.user_attrs]
    assert all(t.state.is_finished() for t in trials)  # no trial lost in RUNNING
    assert len(ran) + len(refused) == len(trials)
    assert len(ran) == 20  # the whole budget, no more
    assert sum(cost(t).rounds for t in trials) == budget
    points = [tuple(sorted(t.params.items())) for t in ran]
    assert len(set(points)) == len(points)  # no grid point twice
    grid_ids = [t.system_attrs["grid_id"] for t in ran]
    assert len(set(grid_ids)) == 20
    assert {cost(t).rounds for t in refused} <= {0}
    # Both workers ran trials, interleaved in time.
    by_worker = {k: [t for t in ran if t.user_attrs[record.WORKER] == k] for k in (0, 1)}
    assert all(by_worker.values()), {k: len(v) for k, v in by_worker.items()}
    first_end = min(max(t.datetime_complete for t in v) for v in by_worker.values())
    assert max(min(t.datetime_start for t in v) for v in by_worker.values()) < first_end


def test_a_trial_is_admitted_only_if_running_trials_below_it_leave_room(task):
    from baselines._budget import Budget, NotRun

    budget = Budget(task, SPACE, seed=0, rounds=2 * ROUNDS, examples=None, max_trials=None)
    study = optuna.create_study(direction="maximize")
    study.optimize(
        baselines.Objective(task, seed=0, space=SPACE), n_trials=1
    )  # 4 of 8 rounds spent
    assert budget.stop_reason(study) is None  # room for one more trial...
    first, second = study.ask(), study.ask()  # ...and two workers both passed that check
    hp = HParams(0.1, 1.0, 10.0)
    study._thread_local.in_optimize_loop = True  # admit() stops the optimize loop it runs in
    with pytest.raises(NotRun, match="needs 4 rounds, 0 of budget_rounds=8 left"):
        budget.admit(second, hp)  # trial 1, running below it, holds the last 4 rounds
    assert second.user_attrs[record.NOT_RUN]["budget"] == {"rounds": 8, "examples": None}
    budget.admit(first, hp)  # the lower number does not count its higher-numbered peer: it runs
    study.tell(second, state=TrialState.FAIL)
    assert budget.stop_reason(study) is not None
