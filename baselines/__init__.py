"""Grid, random and Bayesian search baselines for FATHOM, on the same engine and budget.

What a user would otherwise do: run many static-hyperparameter FedAvg trials
with an Optuna sampler. Every baseline here is a thin configuration of an
Optuna sampler (and optionally a pruner) over ONE shared objective,
:class:`Objective`: a trial is one full FedAvg run through
``fathom_tune.loop.run`` on ``fathom_tune.engine.Engine``, with the three
hyperparameters and bounds that FATHOM ("Federated Hypergradient Descent",
A. K. Kan, arXiv 2211.02106) tunes, drawn on log scales. Each baseline is a
:class:`fathom_tune.tuners.Tuner`, registered under its name (the package's
``fathom_tune.tuners`` entry point), and records its study through
:mod:`fathom_tune.record`; :func:`fathom_tune.record.read_run` reads any of
them back.

Example:
    >>> import fathom_tune, baselines
    >>> task = fathom_tune.tasks.digits().replace(num_rounds=4, eval_every=2)
    >>> out = baselines.run(task, "tpe+median", budget_rounds=12, seed=0)
    >>> out.study.study_name, out.cost.rounds <= 12
    ('digits/tpe+median/seed0', True)
"""

# isort: off
from baselines._objective import Objective
from baselines._objective import projected_cost
from baselines._objective import suggest
from baselines._registry import GP
from baselines._registry import REGISTRY
from baselines._registry import TPE
from baselines._registry import Baseline
from baselines._registry import Grid
from baselines._registry import Hyperband
from baselines._registry import Median
from baselines._registry import Random
from baselines._registry import SuccessiveHalving
from baselines._registry import get
from baselines._study import choose
from baselines._run import run
# isort: on

__all__ = [
    "GP",
    "REGISTRY",
    "TPE",
    "Baseline",
    "Grid",
    "Hyperband",
    "Median",
    "Objective",
    "Random",
    "SuccessiveHalving",
    "choose",
    "get",
    "projected_cost",
    "run",
    "suggest",
]
