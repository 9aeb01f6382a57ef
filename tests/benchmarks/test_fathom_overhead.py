"""Time of a FATHOM round against a plain FedAvg round with the same hyperparameters.

Run: python -m pytest tests/benchmarks/test_fathom_overhead.py -o addopts=""

FATHOM's hyper learning rates are set to 0, so both runs use the task's
initial hyperparameters every round and compile the same programs; the
difference is what FATHOM adds per round: an Optuna trial (ask, suggest from
storage, tell), the global hypergradient H and the moving average m.
"""

import optuna
import pytest

import fathom_tune
from fathom_tune import FathomConfig, FathomSampler, ServerTracker
from fathom_tune._optimize import _FathomSchedule
from fathom_tune.engine import Engine
from fathom_tune.loop import Static, run

ROUNDS_PER_RUN = {"digits": 20, "shakespeare": 3}
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module", params=sorted(ROUNDS_PER_RUN))
def engine(request):
    task = fathom_tune.tasks.get(request.param)
    eng = Engine(task, seed=0)
    run(eng, Static(task.init_hparams), num_rounds=2, eval_every=1000)  # compile
    return eng


def fathom_schedule(engine):
    task = engine.task
    config = FathomConfig(
        init=task.init_hparams,
        bounds=task.bounds,
        gamma_local_epochs=0.0,
        gamma_learning_rate=0.0,
        gamma_batch_size=0.0,
    )
    sampler = FathomSampler(init=task.init_hparams, bounds=task.bounds, config=config)
    study = optuna.create_study(sampler=sampler)
    return _FathomSchedule(study, sampler, ServerTracker.init(engine.init().params))


@pytest.mark.parametrize("tuner", ["fedavg", "fathom"])
def test_round_time_with_and_without_fathom(benchmark, engine, tuner):
    rounds = ROUNDS_PER_RUN[engine.task.name]

    def one_run():
        schedule = (
            Static(engine.task.init_hparams) if tuner == "fedavg" else fathom_schedule(engine)
        )
        return run(engine, schedule, num_rounds=rounds, eval_every=1000)

    benchmark.group = f"{rounds} rounds on {engine.task.name}"
    benchmark.extra_info["tuner"] = tuner
    out = benchmark.pedantic(one_run, rounds=5, warmup_rounds=1)
    assert out.cost.rounds == rounds
