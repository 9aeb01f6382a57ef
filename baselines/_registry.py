"""The baselines: names mapped to frozen configurations of Optuna samplers and pruners.

Each configuration spells out every argument that affects its results, so a
new Optuna release with other defaults does not change them:

* samplers: :class:`Grid` (``GridSampler`` on log-spaced cell centres),
  :class:`Random` (``RandomSampler``), :class:`TPE` (``TPESampler``,
  Bergstra et al. 2011), :class:`GP` (``GPSampler``; needs torch, the
  ``fathom-tune[gp]`` extra);
* pruners: :class:`Hyperband` (Li et al. 2018), :class:`SuccessiveHalving`
  (asynchronous SHA, Li et al. 2020), :class:`Median`. Their resources are
  communication rounds: a trial reports at every evaluation round, so the
  smallest resource is the task's ``eval_every`` and the largest its
  ``num_rounds``.

Example:
    >>> from baselines import REGISTRY, get
    >>> get("tpe+hyperband").pruner
    Hyperband(reduction_factor=3)
    >>> "grid" in REGISTRY
    True
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
from collections.abc import Mapping

import numpy as np
import optuna

from baselines._study import run_study
from fathom_tune import checks
from fathom_tune.hparams import NAMES, Bounds
from fathom_tune.task import Task
from fathom_tune.tuners import Request, Tuner, TuningResult

__all__ = [
    "GP",
    "REGISTRY",
    "TPE",
    "Baseline",
    "Grid",
    "Hyperband",
    "Median",
    "Random",
    "SuccessiveHalving",
    "get",
]


def _check_fields(config, **lows: int | None) -> None:
    """Checks ``config``'s fields: an int >= ``low`` each, a bool where ``low`` is None."""
    owner = type(config).__name__
    for field, low in lows.items():
        name, value = f"{owner}.{field}", getattr(config, field)
        if low is None:
            checks.boolean(name, value)
        else:
            checks.int_range(name, value, low)


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Grid:
    """Exhaustive search over a fixed log-spaced grid (``optuna.samplers.GridSampler``).

    Each hyperparameter's range ``[low, high]`` is cut into ``points`` cells
    of equal width in log space and the grid takes each cell's centre,
    ``exp(log low + (i + 1/2) (log high - log low) / points)``, so no point
    sits on a bound. The default resolution is 4 learning rates x 2 local
    epochs x 3 batch sizes = 24 configurations; on digits' bounds these are
    learning rate 4.2e-4, 7.5e-3, 0.13, 2.4; local epochs 0.056, 1.8; batch
    size 2.5, 16, 102. The order in which the grid is visited is shuffled by
    the study seed (the same order in every worker, so parallel workers
    split the grid without duplicates).

    Attributes:
        points: grid points per hyperparameter, in the order
            ``(learning_rate, local_epochs, batch_size)``.
    """

    points: tuple[int, int, int] = (4, 2, 3)

    def values(self, space: Bounds) -> dict[str, list[float]]:
        """The grid's values per hyperparameter.

        >>> from fathom_tune import Bounds, HParams
        >>> g = Grid(points=(2, 1, 1)).values(Bounds(HParams(1e-4, 1, 1), HParams(1.0, 1, 1)))
        >>> [round(v, 6) for v in g["learning_rate"]]
        [0.001, 0.1]
        """
        out = {}
        for name, k in zip(NAMES, self.points):
            lo, hi = math.log(getattr(space.lower, name)), math.log(getattr(space.upper, name))
            out[name] = [float(math.exp(lo + (i + 0.5) * (hi - lo) / k)) for i in range(k)]
        return out

    def __post_init__(self):
        if not isinstance(self.points, tuple) or len(self.points) != len(NAMES) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.points
        ):
            raise ValueError(f"Grid.points must be a tuple of three ints >= 1, got {self.points!r}")

    def max_trials(self) -> int:
        """Configurations in the grid: the study stops after this many trials."""
        return math.prod(self.points)

    def build(self, space: Bounds, *, seed: int, stream: int) -> optuna.samplers.BaseSampler:
        """The sampler; ``stream`` is ignored (every worker must shuffle the grid alike)."""
        return optuna.samplers.GridSampler(self.values(space), seed=seed)


@dataclasses.dataclass(frozen=True)
class Random:
    """Independent log-uniform draws (``optuna.samplers.RandomSampler``)."""

    def max_trials(self) -> int | None:
        """``None``: no limit on the number of trials."""
        return None

    def build(self, space: Bounds, *, seed: int, stream: int) -> optuna.samplers.BaseSampler:
        """The sampler, seeded by ``(seed, stream)``."""
        return optuna.samplers.RandomSampler(seed=_stream_seed(seed, stream))


@dataclasses.dataclass(frozen=True)
class TPE:
    """Tree-structured Parzen estimator (``optuna.samplers.TPESampler``).

    Attributes:
        n_startup_trials: random trials before the model is used (5, not
            Optuna's 10: budgets here are tens of trials).
        n_ei_candidates: candidates scored per suggestion.
        multivariate: one joint density over the three hyperparameters.
        constant_liar: treat running trials as bad ones, so parallel workers
            do not all suggest the same point.
    """

    n_startup_trials: int = 5
    n_ei_candidates: int = 24
    multivariate: bool = True
    constant_liar: bool = True

    def __post_init__(self):
        _check_fields(
            self, n_startup_trials=0, n_ei_candidates=1, multivariate=None, constant_liar=None
        )

    def max_trials(self) -> int | None:
        """``None``: no limit on the number of trials."""
        return None

    def build(self, space: Bounds, *, seed: int, stream: int) -> optuna.samplers.BaseSampler:
        """The sampler, seeded by ``(seed, stream)``."""
        return optuna.samplers.TPESampler(
            n_startup_trials=self.n_startup_trials,
            n_ei_candidates=self.n_ei_candidates,
            multivariate=self.multivariate,
            group=False,
            constant_liar=self.constant_liar,
            seed=_stream_seed(seed, stream),
        )


@dataclasses.dataclass(frozen=True)
class GP:
    """Gaussian-process Bayesian optimization (``optuna.samplers.GPSampler``).

    Needs torch: install the extra, ``pip install 'fathom-tune[gp]'``.

    Attributes:
        n_startup_trials: random trials before the GP is used.
        deterministic_objective: ``False``: the validation metric of a
            FedAvg run is noisy, so the GP fits a noise term.
    """

    n_startup_trials: int = 5
    deterministic_objective: bool = False

    def __post_init__(self):
        _check_fields(self, n_startup_trials=0, deterministic_objective=None)

    def max_trials(self) -> int | None:
        """``None``: no limit on the number of trials."""
        return None

    @staticmethod
    def check_available() -> None:
        """Raises ``ImportError`` naming the extra when torch is not installed."""
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"the 'gp' baselines use optuna.samplers.GPSampler, which needs {missing}; "
                "install the extra: pip install 'fathom-tune[gp]'"
            )

    def build(self, space: Bounds, *, seed: int, stream: int) -> optuna.samplers.BaseSampler:
        """The sampler, seeded by ``(seed, stream)``."""
        self.check_available()
        return optuna.samplers.GPSampler(
            n_startup_trials=self.n_startup_trials,
            deterministic_objective=self.deterministic_objective,
            seed=_stream_seed(seed, stream),
        )


@dataclasses.dataclass(frozen=True)
class Hyperband:
    """``optuna.pruners.HyperbandPruner`` over rounds: ``min_resource = eval_every``,
    ``max_resource = num_rounds``.

    Attributes:
        reduction_factor: each rung keeps ``1 / reduction_factor`` of its trials.
    """

    reduction_factor: int = 3

    def __post_init__(self):
        _check_fields(self, reduction_factor=2)

    def build(self, task: Task) -> optuna.pruners.BasePruner:
        return optuna.pruners.HyperbandPruner(
            min_resource=task.eval_every,
            max_resource=task.num_rounds,
            reduction_factor=self.reduction_factor,
            bootstrap_count=0,
        )


@dataclasses.dataclass(frozen=True)
class SuccessiveHalving:
    """``optuna.pruners.SuccessiveHalvingPruner`` over rounds: ``min_resource = eval_every``.

    Attributes:
        reduction_factor: each rung keeps ``1 / reduction_factor`` of its trials;
            rungs sit at ``eval_every * reduction_factor**k`` rounds.
        min_early_stopping_rate: rungs skipped at the bottom.
    """

    reduction_factor: int = 3
    min_early_stopping_rate: int = 0

    def __post_init__(self):
        _check_fields(self, reduction_factor=2, min_early_stopping_rate=0)

    def build(self, task: Task) -> optuna.pruners.BasePruner:
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=task.eval_every,
            reduction_factor=self.reduction_factor,
            min_early_stopping_rate=self.min_early_stopping_rate,
            bootstrap_count=0,
        )


@dataclasses.dataclass(frozen=True)
class Median:
    """``optuna.pruners.MedianPruner``: prune a trial worse than the median of earlier
    trials at the same round.

    Attributes:
        n_startup_trials: trials that are never pruned, so the median has support.
        n_warmup_evals: evaluations before pruning may start; pruning is
            first possible at round ``n_warmup_evals * eval_every``.
    """

    n_startup_trials: int = 3
    n_warmup_evals: int = 1

    def __post_init__(self):
        _check_fields(self, n_startup_trials=0, n_warmup_evals=0)

    def build(self, task: Task) -> optuna.pruners.BasePruner:
        return optuna.pruners.MedianPruner(
            n_startup_trials=self.n_startup_trials,
            n_warmup_steps=self.n_warmup_evals * task.eval_every,
            interval_steps=1,
            n_min_trials=1,
        )


@dataclasses.dataclass(frozen=True)
class Baseline(Tuner):
    """A baseline: a sampler configuration and an optional pruner configuration.

    Attributes:
        name: the registry name, used in study names (``<task>/<name>/seed<k>``).
        sampler: :class:`Grid`, :class:`Random`, :class:`TPE` or :class:`GP`.
        pruner: :class:`Hyperband`, :class:`SuccessiveHalving`, :class:`Median`
            or ``None`` (every trial runs to the end).
    """

    name: str
    sampler: Grid | Random | TPE | GP
    pruner: Hyperband | SuccessiveHalving | Median | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"Baseline.name must be a non-empty str without '/', got {self.name!r}")
        if not isinstance(self.sampler, (Grid, Random, TPE, GP)):
            raise TypeError(
                f"Baseline.sampler must be a Grid, Random, TPE or GP, got {self.sampler!r}"
            )
        if self.pruner is not None and not isinstance(
            self.pruner, (Hyperband, SuccessiveHalving, Median)
        ):
            raise TypeError(
                "Baseline.pruner must be a Hyperband, SuccessiveHalving, Median or None, "
                f"got {self.pruner!r}"
            )

    def build_pruner(self, task: Task) -> optuna.pruners.BasePruner:
        """The study's pruner (``NopPruner`` without one)."""
        if self.pruner is None:
            return optuna.pruners.NopPruner()
        return self.pruner.build(task)

    def check_available(self) -> None:
        """Raises ``ImportError`` naming the extra when the sampler's dependencies are missing."""
        if isinstance(self.sampler, GP):
            self.sampler.check_available()

    def describe(self) -> dict:
        """Every setting of the sampler and the pruner, for the run record."""
        return {"sampler": repr(self.sampler), "pruner": repr(self.pruner)}

    def tune(self, request: Request) -> TuningResult:
        """:func:`baselines.run` with this baseline (default budget: ten runs of
        ``task.num_rounds``; with a ``checkpoint_dir``, trials checkpoint into
        ``<checkpoint_dir>/<task>-<name>-seed<k>/``)."""
        task, directory = request.task, request.checkpoint_dir
        if directory is not None:
            directory = directory / request.study_name(self.name).replace("/", "-")
            directory.mkdir(exist_ok=True)
        return run_study(
            task,
            self,
            budget_rounds=10 * task.num_rounds if request.budget_rounds is None else request.budget_rounds,
            seed=request.seed,
            storage=request.storage,
            checkpoint_dir=directory,
            progress=request.progress,
        )


def _registry(*baselines: Baseline) -> Mapping[str, Baseline]:
    return types.MappingProxyType({b.name: b for b in baselines})


REGISTRY: Mapping[str, Baseline] = _registry(
    Baseline("grid", Grid()),
    Baseline("random", Random()),
    Baseline("tpe", TPE()),
    Baseline("gp", GP()),
    Baseline("random+median", Random(), Median()),
    Baseline("random+sha", Random(), SuccessiveHalving()),
    Baseline("random+hyperband", Random(), Hyperband()),
    Baseline("tpe+median", TPE(), Median()),
    Baseline("tpe+sha", TPE(), SuccessiveHalving()),
    Baseline("tpe+hyperband", TPE(), Hyperband()),
)
"""Every baseline by name (read-only)."""


def get(name: str) -> Baseline:
    """The baseline registered as ``name``.

    Raises:
        ValueError: unknown ``name``; the message lists the valid names.

    Example:
        >>> get("random").sampler
        Random()
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown baseline {name!r}; valid names: {sorted(REGISTRY)}")
    return REGISTRY[name]
