"""Grid, random and Bayesian search baselines for FATHOM, on the same engine and budget.

What a user would otherwise do: run many static-hyperparameter FedAvg trials
with an Optuna sampler. Every baseline here is a thin configuration of an
Optuna sampler (and optionally a pruner) over ONE shared objective,
:class:`Objective`: a trial is one full FedAvg run through
``fathom_tune.loop.run`` on ``fathom_tune.engine.Engine``, with the three
hyperparameters and bounds that FATHOM ("Federated Hypergradient Descent",
A. K. Kan, arXiv 2211.02106) tunes, drawn on log scales. The Optuna storage
is the record: :func:`history`, :func:`cost_to_target` and :func:`choose`
read everything back from it.

Example:
    >>> import fathom_tune, baselines
    >>> task = fathom_tune.tasks.digits().replace(num_rounds=4, eval_every=2)
    >>> out = baselines.run(task, "tpe+median", budget_rounds=12, seed=0, progress=False)
    >>> out.study.study_name, out.cost.rounds <= 12
    ('digits/tpe+median/seed0', True)
"""

# isort: off
from baselines._objective import EVALS_ATTR
from baselines._objective import LEDGER_ATTRS
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
from baselines._run import NOT_RUN_ATTR
from baselines._run import WORKER_ATTR
from baselines._run import BaselineResult
from baselines._run import choose
from baselines._run import cost_to_target
from baselines._run import history
from baselines._run import run
from baselines._run import total_cost
# isort: on

__all__ = [
    "EVALS_ATTR",
    "GP",
    "LEDGER_ATTRS",
    "NOT_RUN_ATTR",
    "REGISTRY",
    "TPE",
    "WORKER_ATTR",
    "Baseline",
    "BaselineResult",
    "Grid",
    "Hyperband",
    "Median",
    "Objective",
    "Random",
    "SuccessiveHalving",
    "choose",
    "cost_to_target",
    "get",
    "history",
    "projected_cost",
    "run",
    "suggest",
    "total_cost",
]
