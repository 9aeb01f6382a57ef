"""Samplers whose draws for a trial depend only on the study's state and the trial's place.

Optuna's samplers keep one random generator for a whole study, so a study
continued in a new process (after a crash, a Ctrl-C or a kill) draws other
hyperparameters than an uninterrupted one would. :class:`PerTrialSeed` builds
the baseline's sampler afresh for every trial, seeded by (baseline, worker,
the trial's place among the study's runs), so re-running a study gives the
same trials as running it once. Samplers here keep nothing else between
trials: TPE and GP read the history from the storage, the grid reads which
cells are taken.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from baselines._objective import origin

__all__ = ["PerTrialSeed"]


class PerTrialSeed(BaseSampler):
    """Delegates to ``build(stream)``, rebuilt before each trial with a stream of its own.

    The stream is a function of the baseline's ``name`` (so two baselines on
    one seed do not draw the same points), the ``worker`` and the trial's
    *place*: how many runs the study started before it, a retry of a killed
    trial counting as its original (so a retry shifts no later draw).

    Args:
        build: makes the inner sampler from an int stream.
        name: the baseline's name.
        worker: the worker index.
    """

    def __init__(self, build: Callable[[int], BaseSampler], *, name: str, worker: int) -> None:
        self._build = build
        self._key = (zlib.crc32(name.encode()), worker)
        self._inner = build(self._stream(0))

    @property
    def inner(self) -> BaseSampler:
        """The sampler of the latest trial."""
        return self._inner

    def _stream(self, place: int) -> int:
        return int(np.random.SeedSequence([*self._key, place]).generate_state(1)[0])

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        earlier = {origin(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number}
        self._inner = self._build(self._stream(len(earlier)))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
