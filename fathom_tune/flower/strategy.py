"""FATHOM as a Flower strategy: FedAvg whose eta, E and B an Optuna study tunes every round.

FATHOM is the method of "Federated Hypergradient Descent" (A. K. Kan,
arXiv 2211.02106). :class:`FathomFedAvg` is Flower's Message-API
:class:`flwr.serverapp.strategy.FedAvg` with FATHOM's server side:

* ``configure_train`` asks the study for a trial, gets the round's
  ``(eta, E, B)`` from :class:`~fathom_tune.FathomSampler` and sends them in
  the round's ``ConfigRecord`` (keys in :mod:`fathom_tune.flower.protocol`);
* ``aggregate_train`` forms ``Delta_i = x0 - x_{K_i}`` from each reply,
  ``(u, G) = aggregate_round(Delta, phi, n)``, ``H = cos(m, u)`` with
  :class:`~fathom_tune.ServerTracker`, applies ``x <- x - u``, records the
  round through :mod:`fathom_tune.record` and tells the trial, exactly as
  :func:`fathom_tune.optimize` does: the next round's values are FATHOM's one
  hyper step (:func:`fathom_tune.fathom.state.next_hparams`, through the sampler). A round whose loss or update is not
  finite is discarded (model and ``m`` unchanged), marked with
  :func:`~fathom_tune.report_divergence` and told ``FAIL``; the sampler then
  halves the learning rate.

The study lives in any Optuna storage (one trial per round, named
``<task>/fathom-flower/seed<k>``), so optuna-dashboard shows the run while it
trains. With ``checkpoint=`` the model, ``m`` and the round are written
atomically after every round and a new run with the same checkpoint and
storage continues where the last one stopped (:mod:`fathom_tune.flower.resume`,
which settles the study as every one-run tuner's resume does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

import optuna
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from optuna.trial import TrialState

from fathom_tune import checks
from fathom_tune.engine import Cost
from fathom_tune.fathom import (
    FathomConfig,
    FathomSampler,
    ServerTracker,
    report_divergence,
    report_round,
)
from fathom_tune.flower import protocol, resume
from fathom_tune.flower.rounds import RoundReport
from fathom_tune.flower.server import aggregate, collect, round_cost, sample_nodes
from fathom_tune.hparams import Bounds, HParams
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import open_storage, record
from fathom_tune.task import Target, Task

__all__ = ["TUNER", "FathomFedAvg"]

TUNER = "fathom-flower"
"""The tuner name in the study's record and name."""

_log = logging.getLogger(__name__)


def _fraction(name: str, value, *, allow_zero: bool) -> float:
    value = checks.nonnegative_real(name, value)
    if value > 1.0 or (value == 0.0 and not allow_zero):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return value


@dataclasses.dataclass
class _Round:
    trial: optuna.Trial
    index: int
    hparams: HParams
    x0: dict
    nodes: list
    started: float


class FathomFedAvg(FedAvg):
    """FedAvg tuned by FATHOM, one Optuna trial per round.

    Args:
        task: the task's name (the study is ``<task>/fathom-flower/seed<k>``).
        target: the quality the run aims at (reports measure rounds to it).
        init: the first round's hyperparameters.
        bounds: the box FATHOM keeps them in.
        config: hyper learning rates and ``alpha`` (default :class:`FathomConfig`).
        seed: the sampler's seed, the node sampling's (with the round) and the
            study name's.
        storage: ``None`` (in memory), an Optuna storage, an RDB URL or a
            journal file path (:func:`fathom_tune.open_storage`).
        study_name: default ``<task>/fathom-flower/seed<seed>``.
        eval_every: call ``start``'s ``evaluate_fn`` every this many rounds
            and after the last; its metrics are recorded on the round's trial.
        checkpoint: an ``.npz`` path for resuming (needs a persistent storage).
        test_fn: ``ArrayRecord -> metrics`` of the final model on test data,
            recorded in the study's outcome.
        on_round: called with each round's :class:`RoundReport`.
        node_wait: seconds to wait for enough nodes before a round; then the
            run stops with ``RuntimeError`` (the study keeps finished rounds).
        fraction_train, min_train_nodes, min_available_nodes: node sampling
            as in Flower's FedAvg (nodes drawn by ``(seed, round)``).
        fraction_evaluate, min_evaluate_nodes: federated evaluation, as in
            Flower's FedAvg (default off: the server evaluates).

    Use :meth:`for_task` to fill ``task``, ``target``, ``init`` and
    ``bounds`` from a :class:`fathom_tune.Task`. Run it with
    ``strategy.start(grid, initial_arrays, num_rounds, ...)`` in a ServerApp;
    ``num_rounds`` counts the whole run, rounds done before a resume included.
    The model's arrays must be floating point; clients reply with
    :func:`~fathom_tune.flower.train_reply`.

    Example (the ServerApp of ``examples/flower``, shortened):

    .. code-block:: python

        app = ServerApp()

        @app.main()
        def main(grid, context):
            task = fathom_tune.tasks.digits()
            engine = fathom_tune.Engine(task)
            strategy = FathomFedAvg.for_task(task, storage="sqlite:////srv/fathom.db",
                                             checkpoint="/srv/fathom.npz")
            strategy.start(grid, to_array_record(engine.init().params), num_rounds=30,
                           evaluate_fn=validate)
    """

    def __init__(
        self,
        *,
        task: str,
        target: Target,
        init: HParams,
        bounds: Bounds,
        config: FathomConfig | None = None,
        seed: int = 0,
        storage=None,
        study_name: str | None = None,
        eval_every: int = 1,
        checkpoint=None,
        test_fn: Callable[[ArrayRecord], Mapping[str, float]] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        node_wait: float = 60.0,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
    ) -> None:
        if not isinstance(task, str) or not task or "/" in task:
            raise ValueError(f"task must be a non-empty str without '/', got {task!r}")
        if not isinstance(target, Target):
            raise TypeError(f"target must be a fathom_tune.Target, got {target!r}")
        super().__init__(
            fraction_train=_fraction("fraction_train", fraction_train, allow_zero=False),
            fraction_evaluate=_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True),
            min_train_nodes=checks.positive_int("min_train_nodes", min_train_nodes),
            min_evaluate_nodes=checks.int_range("min_evaluate_nodes", min_evaluate_nodes, 0),
            min_available_nodes=checks.positive_int("min_available_nodes", min_available_nodes),
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
        )
        for name, fn in (("test_fn", test_fn), ("on_round", on_round)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {fn!r}")
        self.task_name, self.target = task, target
        self.seed = checks.seed("seed", seed)
        self.eval_every = checks.positive_int("eval_every", eval_every)
        self.node_wait = checks.nonnegative_real("node_wait", node_wait)
        self.test_fn, self.on_round = test_fn, on_round
        self.checkpoint = ckpt.check_path(checkpoint)
        if self.checkpoint is not None and storage is None:
            raise ValueError(
                "checkpoint needs a persistent storage (an RDB URL or a journal file path): "
                "the rounds of an in-memory study would be lost with the process"
            )
        self.sampler = FathomSampler(init=init, bounds=bounds, config=config, seed=self.seed)
        name = study_name or record.study_name(task, TUNER, self.seed)
        self.study = optuna.create_study(storage=open_storage(storage), study_name=name, sampler=self.sampler,
                                         direction="minimize", load_if_exists=True)
        self._tracker: ServerTracker | None = None
        self._round: _Round | None = None
        self._done = 0
        self._num_rounds = 0
        self._model: dict = {}
        self._evaluate_fn = None
        self._evals: dict[int, MetricRecord] = {}
        self._validation: dict = {}

    @classmethod
    def for_task(cls, task: Task, *, config: FathomConfig | None = None, **kwargs) -> FathomFedAvg:
        """A strategy for a :class:`fathom_tune.Task`: its name, target, and the
        ``init``/``bounds`` of ``config.resolve(task)``."""
        if not isinstance(task, Task):
            raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
        config = (FathomConfig() if config is None else config).resolve(task)
        return cls(task=task.name, target=task.target, init=config.init, bounds=config.bounds, config=config,
                   **kwargs)

    def summary(self) -> None:
        super().summary()
        _log.info("FATHOM: study %r, %s", self.study.study_name, self.sampler.config.settings())

    # ------------------------------------------------------------------ run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Runs the rounds of a ``num_rounds``-round run not done yet (as Flower's ``start``).

        ``evaluate_fn(server_round, arrays)`` is the server-side validation,
        called on evaluation rounds (``eval_every``) before the round's
        trial is told, and recorded on it.

        Raises:
            ValueError: the study already holds rounds but no checkpoint
                continues it.
            fathom_tune.CheckpointError: the checkpoint is damaged or from
                another run or model.
            RuntimeError: too few nodes connected within ``node_wait``.
            TypeError: an array of ``initial_arrays`` is not floating point.
        """
        self._num_rounds = checks.positive_int("num_rounds", num_rounds)
        x0 = protocol.numpy_arrays(initial_arrays, floating=True)
        lock = ckpt.exclusive(self.checkpoint) if self.checkpoint else contextlib.nullcontext()
        with lock:
            state = resume.restore(self.study, self.checkpoint, x0)
            self._model, self._done, self._validation = state.model, state.done, state.validation
            self._tracker = ServerTracker(momentum=state.momentum, alpha=self.sampler.config.alpha)
            if self._done:
                _log.info("FATHOM %s: resumed after round %d", self.study.study_name, self._done)
            record.write_header(
                self.study,
                task=self.task_name,
                tuner=TUNER,
                seed=self.seed,
                unit="round",
                target=self.target,
                rounds_per_run=self._num_rounds,
                budget_rounds=self._num_rounds,
                config={**self.sampler.config.settings(), "eval_every": self.eval_every},
                objective="train_loss",
            )
            self._evaluate_fn = evaluate_fn
            if self._done < self._num_rounds:
                flower_eval = None if evaluate_fn is None else self._flower_evaluate
                result = super().start(
                    grid,
                    protocol.to_array_record(self._model),
                    self._num_rounds - self._done,
                    timeout,
                    train_config,
                    evaluate_config,
                    flower_eval,
                )
            else:
                _log.info("study %r already holds all %d rounds", self.study.study_name, self._num_rounds)
                result = Result(arrays=protocol.to_array_record(self._model))
            final = protocol.to_array_record(self._model)
            test = {} if self.test_fn is None else dict(self.test_fn(final))
            ledger = sum((record.step_cost(t) for t in self.study.get_trials(deepcopy=False)), Cost())
            record.write_outcome(
                self.study,
                hparams=self.sampler.next_hparams(self.study),
                validation=self._validation,
                test=test,
                ledger=ledger,
            )
        return result

    def _flower_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower's evaluation of the initial model
            return self._evaluate_fn(self._done, arrays) if self._done == 0 else None
        return self._evals.pop(server_round, None)

    # ---------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Samples nodes, asks the round's trial and sends ``(eta, E, B)`` with the model."""
        index = self._done
        nodes = self._sample_nodes(grid, index)
        trial = self.study.ask()
        trial.set_user_attr(record.ROUND, index)
        hparams = self.sampler.suggest(trial)
        _log.info("round %d: %s to %d nodes", index, hparams, len(nodes))
        for key, value in protocol.hparams_to_config(hparams, index).items():
            config[key] = value
        config["server-round"] = server_round
        self._round = _Round(trial, index, hparams, dict(self._model), nodes, time.perf_counter())
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def _sample_nodes(self, grid: Grid, index: int) -> list[int]:
        try:
            return sample_nodes(
                grid,
                seed=self.seed,
                round_index=index,
                fraction=self.fraction_train,
                min_train=self.min_train_nodes,
                min_available=self.min_available_nodes,
                wait=self.node_wait,
            )
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}. Study {self.study.study_name!r} keeps the {index} round(s) finished so "
                "far; start more nodes and run again with the same storage and checkpoint to resume"
            ) from None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FATHOM's server step on the replies; records and tells the round's trial."""
        pending, self._round = self._round, None
        if pending is None:
            raise RuntimeError("aggregate_train called without configure_train")
        trial, x0 = pending.trial, pending.x0
        try:
            got, failed = collect(replies, x0, pending.hparams, pending.index)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        seconds = time.perf_counter() - pending.started
        cost = round_cost(x0, got, pending.hparams, len(pending.nodes), seconds)
        steps = {record.LOCAL_STEPS: cost.steps, record.ROUND: pending.index}
        if not got.node_ids:
            _log.warning("round %d: no node replied (%d errors, %d sampled); the round is recorded FAIL "
                         "and the next round repeats its hyperparameters", pending.index, failed, len(pending.nodes))
            record.write_step(trial, cost=cost, evals=[], **steps)
            self._finish(trial, None)
            return None, None
        agg = aggregate(x0, got)
        H = math.nan
        if agg.finite:
            h, self._tracker = self._tracker.update(agg.update)
            H = float(h)
            self._model = agg.apply(x0)
        metrics = self._evaluate(server_round, pending.index, agg.finite)
        evals = [] if metrics is None else [record.evaluation(1, cost.examples, metrics)]
        record.write_step(trial, cost=cost, evals=evals, **steps)
        if agg.finite:
            report_round(trial, G=agg.G, H=H)
        else:
            report_divergence(trial)
            _log.warning("round %d diverged (loss %r): its model is discarded", pending.index, agg.train_loss)
        self._finish(trial, agg.train_loss if agg.finite else None)
        if self.on_round is not None:
            self.on_round(RoundReport.of(pending.index, trial.number, pending.hparams, x0, got, agg, H))
        out = {"fathom-G": agg.G, **protocol.hparams_to_config(pending.hparams, pending.index)}
        if agg.finite:
            out.update({"fathom-H": H, protocol.TRAIN_LOSS: agg.train_loss})
        return (protocol.to_array_record(self._model) if agg.finite else None), MetricRecord(out)

    def _evaluate(self, server_round: int, index: int, accepted: bool) -> dict | None:
        last = index == self._num_rounds - 1
        if self._evaluate_fn is None or not (last or (accepted and (index + 1) % self.eval_every == 0)):
            return None
        metrics = self._evaluate_fn(server_round, protocol.to_array_record(self._model))
        if metrics is None:
            return None
        self._evals[server_round] = metrics
        self._validation = {k: float(v) for k, v in metrics.items()}
        return self._validation

    def _finish(self, trial: optuna.Trial, value: float | None) -> None:
        """Checkpoints the round (model, ``m``, how to tell the trial), then tells the trial."""
        self._done += 1
        if self.checkpoint is not None:
            state = resume.RunState(self._model, self._tracker.momentum, self._done, self._validation)
            resume.save(self.checkpoint, self.study, state, trial=trial.number, value=value)
        if value is None:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, value)
