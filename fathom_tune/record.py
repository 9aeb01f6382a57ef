"""The run record, as users import it: the schema and writers of
:mod:`fathom_tune.storage.record`, the reader of :mod:`fathom_tune.storage.reader`,
the batched writers of :mod:`fathom_tune.storage.bulk`, and each tuner's own keys
(``FATHOM_*`` of :mod:`fathom_tune.fathom.sampler`, ``FEDEX_*`` of
:mod:`fathom_tune.peers.fedex`, ``FEDHYPER_*`` of :mod:`fathom_tune.peers.fedhyper`),
under one name. Package code imports each from the module that owns it.

Example:
    >>> from fathom_tune import record
    >>> record.study_name("digits", "fathom", 0)
    'digits/fathom/seed0'
"""

from fathom_tune.fathom.sampler import FATHOM_DIVERGED, FATHOM_G, FATHOM_H, FATHOM_REJECTED
from fathom_tune.peers.fedex import (
    FEDEX_ARMS,
    FEDEX_BASELINE,
    FEDEX_CANDIDATES,
    FEDEX_EXPLORING,
    FEDEX_THETA,
)
from fathom_tune.peers.fedhyper import FEDHYPER_A, FEDHYPER_BETA, FEDHYPER_BETA_MEAN
from fathom_tune.storage.bulk import add_trials, set_study_attrs
from fathom_tune.storage.reader import RunRecord, load_runs, read_run
from fathom_tune.storage.record import *  # noqa: F403 - the schema's names, listed in its __all__

__all__ = [
    "BUDGET_EXAMPLES",
    "BUDGET_ROUNDS",
    "CHOSEN_TRIAL",
    "CONFIG",
    "COST",
    "DIVERGED",
    "EVALS",
    "FATHOM_DIVERGED",
    "FATHOM_G",
    "FATHOM_H",
    "FATHOM_REJECTED",
    "FEDEX_ARMS",
    "FEDEX_BASELINE",
    "FEDEX_CANDIDATES",
    "FEDEX_EXPLORING",
    "FEDEX_THETA",
    "FEDHYPER_A",
    "FEDHYPER_BETA",
    "FEDHYPER_BETA_MEAN",
    "HPARAMS",
    "INTERRUPTED",
    "LEDGER",
    "LOCAL_STEPS",
    "NOT_RUN",
    "RESERVED_EXAMPLES",
    "RESERVED_ROUNDS",
    "ROUND",
    "ROUNDS_PER_RUN",
    "STALE",
    "TEST",
    "UNITS",
    "VALIDATION",
    "WALL",
    "WORKER",
    "RunRecord",
    "add_trials",
    "add_wall_time",
    "diverged",
    "evaluation",
    "finished_rounds",
    "load_runs",
    "log_distributions",
    "mark_stale",
    "read_run",
    "round_trial",
    "set_study_attrs",
    "step_cost",
    "study_name",
    "write_header",
    "write_outcome",
    "write_step",
]
