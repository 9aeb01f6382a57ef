"""Federated tasks: data splits, a FedJAX model, and the task's defaults."""

from __future__ import annotations

import dataclasses
import math
import numbers

import fedjax

from fathom_tune import checks
from fathom_tune.hparams import Bounds, HParams

__all__ = ["Target", "Task"]


@dataclasses.dataclass(frozen=True)
class Target:
    """The quality a tuned model must reach, e.g. validation accuracy >= 0.9.

    Attributes:
        metric: name of one of the model's ``eval_metrics``.
        value: the threshold.
        mode: ``"max"`` when larger is better (accuracy), ``"min"`` for a loss.
    """

    metric: str
    value: float
    mode: str = "max"

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError(f"Target.metric must be a non-empty str, got {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"Target.mode must be 'max' or 'min', got {self.mode!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real):
            raise TypeError(f"Target.value must be a real number, got {self.value!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"Target.value must be finite, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def reached(self, metric_value: float) -> bool:
        """Whether ``metric_value`` meets the target.

        >>> Target("accuracy", 0.9).reached(0.91), Target("loss", 1.0, "min").reached(1.2)
        (True, False)
        """
        if not math.isfinite(metric_value):
            return False
        if self.mode == "max":
            return metric_value >= self.value
        return metric_value <= self.value


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A federated learning task and its defaults.

    Built-in tasks come from :mod:`fathom_tune.tasks`; a task over your own
    data from :func:`fathom_tune.tasks.from_arrays`.

    Attributes:
        name: short identifier, used in study names (``<task>/<tuner>/seed<k>``).
        train: federated training data; every client must hold examples.
        validation: held-out clients used for tuning decisions.
        test: held-out clients used only for the final report.
        model: the FedJAX model (``fedjax.Model``).
        clients_per_round: clients sampled each communication round.
        num_rounds: default length of one training run.
        eval_every: evaluate on validation every this many rounds.
        target: the quality to reach, see each task's docstring for its origin.
        init_hparams: the paper-style default start.
        bounds: lower and upper bounds of the three hyperparameters.
    """

    name: str
    train: fedjax.FederatedData
    validation: fedjax.FederatedData
    test: fedjax.FederatedData
    model: fedjax.Model
    clients_per_round: int
    num_rounds: int
    eval_every: int
    target: Target
    init_hparams: HParams
    bounds: Bounds

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"Task.name must be a non-empty str without '/', got {self.name!r}")
        for split in ("train", "validation", "test"):
            fd = getattr(self, split)
            if not isinstance(fd, fedjax.FederatedData):
                raise TypeError(
                    f"Task.{split} must be a fedjax.FederatedData, got {type(fd).__name__}"
                )
            if fd.num_clients() == 0:
                raise ValueError(f"Task.{split} has no clients; at least one is required")
            for cid, size in fd.client_sizes():
                if size == 0:
                    raise ValueError(
                        f"Task.{split}: client {cid!r} has 0 examples; every client needs >= 1"
                    )
        if not isinstance(self.model, fedjax.Model):
            raise TypeError(f"Task.model must be a fedjax.Model, got {type(self.model).__name__}")
        for f in ("clients_per_round", "num_rounds", "eval_every"):
            checks.positive_int(f"Task.{f}", getattr(self, f))
        n = self.train.num_clients()
        if self.clients_per_round > n:
            raise ValueError(
                f"Task.clients_per_round={self.clients_per_round} exceeds the {n} training "
                f"clients; allowed: 1..{n}"
            )
        if not isinstance(self.target, Target):
            raise TypeError(f"Task.target must be a Target, got {self.target!r}")
        if self.target.metric not in self.model.eval_metrics:
            raise ValueError(
                f"Task.target.metric={self.target.metric!r} is not one of the model's "
                f"eval_metrics {sorted(self.model.eval_metrics)}"
            )
        if not isinstance(self.init_hparams, HParams):
            raise TypeError(f"Task.init_hparams must be an HParams, got {self.init_hparams!r}")
        if not isinstance(self.bounds, Bounds):
            raise TypeError(f"Task.bounds must be a Bounds, got {self.bounds!r}")
        self.bounds.check(self.init_hparams, "Task.init_hparams")

    def replace(self, **changes) -> Task:
        """A copy with some fields changed (validated again).

        >>> import fathom_tune
        >>> t = fathom_tune.tasks.digits().replace(num_rounds=5)
        >>> t.num_rounds
        5
        """
        return dataclasses.replace(self, **changes)
