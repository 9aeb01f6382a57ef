"""Time of a FATHOM round against a plain FedAvg round with the same hyperparameters.

Run: python -m pytest tests/benchmarks/test_fathom_overhead.py -o addopts=""

FATHOM's hyper learning rates are set to 0, so both runs use the task's
initial hyperparameters every round; the difference is what FATHOM adds per
round: its client statistic phi in the local steps, an Optuna trial (ask,
suggest from storage, tell), the global hypergradient H and the moving
average m. Both go through the public entry points (``fathom_tune.fedavg``,
``fathom_tune.optimize``), so each also evaluates its final model on test.

A third run, ``optuna-trial``, is FedAvg that also records each round as a
bare in-memory Optuna trial (ask, three ``suggest_float`` from a fixed
sampler, the same user attributes, tell) and nothing else: the part of
FATHOM's cost that comes from the one-trial-per-round protocol itself.
"""

import optuna
import pytest

import fathom_tune
from fathom_tune import FathomConfig
from fathom_tune.engine import Engine
from fathom_tune.hparams import NAMES
from fathom_tune.loop import Outcome, run

ROUNDS_PER_RUN = {"digits": 20, "shakespeare": 3}
FROZEN = FathomConfig(gamma_local_epochs=0.0, gamma_learning_rate=0.0, gamma_batch_size=0.0)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module", params=sorted(ROUNDS_PER_RUN))
def task(request):
    task = fathom_tune.tasks.get(request.param)
    fathom_tune.fedavg(task, num_rounds=2, eval_every=1000)  # compile both engines' programs
    fathom_tune.optimize(task, config=FROZEN, num_rounds=2, eval_every=1000)
    return task


class _Fixed(optuna.samplers.BaseSampler):
    """Suggests one fixed set of values, with no reading of the study."""

    def __init__(self, hparams):
        self.values = {n: getattr(hparams, n) for n in NAMES}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        return self.values[name]


class _TrialPerRound:
    """FedAvg that records every round as a bare Optuna trial."""

    def __init__(self, task):
        self.study = optuna.create_study(sampler=_Fixed(task.init_hparams))
        self.bounds = task.bounds
        self.trial = None

    def propose(self, round_index):
        self.trial = self.study.ask()
        self.trial.set_user_attr("round", round_index)
        lower, upper = self.bounds.lower, self.bounds.upper
        values = {
            n: self.trial.suggest_float(n, getattr(lower, n), getattr(upper, n), log=True)
            for n in NAMES
        }
        return fathom_tune.HParams(**values)

    def observe(self, result, metrics, accepted):
        for key, value in (
            ("local_steps", int(result.local_steps.sum())),
            ("examples", int(result.cost.examples)),
            ("fathom.G", 0.0),
            ("fathom.H", 0.0),
        ):
            self.trial.set_user_attr(key, value)
        self.study.tell(self.trial, result.train_loss)
        return Outcome()


def one_run(tuner, task, rounds):
    if tuner == "fedavg":
        return fathom_tune.fedavg(task, num_rounds=rounds, eval_every=1000)
    if tuner == "optuna-trial":
        return run(Engine(task), _TrialPerRound(task), num_rounds=rounds, eval_every=1000)
    return fathom_tune.optimize(task, config=FROZEN, num_rounds=rounds, eval_every=1000)


@pytest.mark.parametrize("tuner", ["fedavg", "optuna-trial", "fathom"])
def test_round_time_with_and_without_fathom(benchmark, task, tuner):
    rounds = ROUNDS_PER_RUN[task.name]
    benchmark.group = f"{rounds} rounds on {task.name}"
    benchmark.extra_info["tuner"] = tuner
    out = benchmark.pedantic(one_run, args=(tuner, task, rounds), rounds=5, warmup_rounds=1)
    assert out.cost.rounds == rounds
