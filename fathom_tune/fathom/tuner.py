"""FATHOM as a :class:`~fathom_tune.tuners.Tuner`: one training run, tuned while it trains."""

from __future__ import annotations

import dataclasses

import optax

from fathom_tune.fathom.optimize import optimize
from fathom_tune.fathom.state import FathomConfig
from fathom_tune.tuning.driver import one_run_storage
from fathom_tune.tuning.one_run import DEFAULT_NET
from fathom_tune.tuning.safety import SafetyNet
from fathom_tune.tuning.tuner import Request, Tuner, TuningResult

__all__ = ["Fathom"]


@dataclasses.dataclass(frozen=True)
class Fathom(Tuner):
    """FATHOM ("Federated Hypergradient Descent", arXiv 2211.02106) as a registered tuner.

    :meth:`~fathom_tune.tuners.Tuner.run` spends one training run of ``task.num_rounds`` rounds
    whatever the budget (FATHOM's claim is one run instead of many) through
    :func:`fathom_tune.optimize`. With a persistent storage and a
    ``checkpoint_dir`` it is crash-safe and re-runnable: a finished run is
    read back from the storage, a run cut off mid-way continues from its
    checkpoint, and a partial study without a checkpoint (its model is lost)
    is deleted and run again from round 0.

    Attributes:
        name: the registry name (``"fathom"``); a variant with another
            ``config`` needs its own name.
        config: FATHOM's settings.
        server_optimizer: the engine's server optimizer (an optax
            transformation of the FedAvg update); ``None``: plain FedAvg.
            ``fathom+server`` passes FedHyper-GM's server learning rate
            (:func:`fathom_tune.peers.fedhyper_server`).
        safety_net: the run's :class:`~fathom_tune.SafetyNet` (default on);
            ``None``: the paper's FATHOM.
    """

    name: str = "fathom"
    config: FathomConfig = FathomConfig()
    server_optimizer: optax.GradientTransformation | None = None
    safety_net: SafetyNet | None = DEFAULT_NET

    def tune(self, request: Request) -> TuningResult:
        task = request.task
        name = request.study_name(self.name)
        opened, path, finished = one_run_storage(request, name)
        if finished is not None:
            return finished
        return optimize(
            task,
            config=self.config,
            seed=request.seed,
            storage=opened,
            study_name=name,
            checkpoint=path,
            progress=request.progress,
            tuner=self.name,
            safety_net=self.safety_net,
            **({} if self.server_optimizer is None else {"server_optimizer": self.server_optimizer}),
        )
