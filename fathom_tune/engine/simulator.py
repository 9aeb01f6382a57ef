"""The FedAvg simulator: rounds whose client hyperparameters may change every round.

One round (McMahan et al. 2017, FedAvg; conventions of FATHOM, "Federated
Hypergradient Descent", A. K. Kan, arXiv 2211.02106):

1. ``clients_per_round`` clients are sampled uniformly without replacement, as a
   function of ``(seed, round)`` only.
2. Client ``i`` (``n_i`` examples) starts at the server model ``x0`` and runs
   ``K_i = max(ceil(E * n_i / B_int), 1)`` SGD steps
   ``x_{k+1} = x_k - eta * g_k``; each step's gradient is the mean loss over
   exactly ``B_int`` of its examples, drawn by shuffling and repeating the
   client's data with a generator seeded by ``(seed, round, client)``.
   An optional *client statistic* (:class:`ClientStatistic`, e.g. FATHOM's
   ``phi_i = min_k cos(g_k, x0 - x_{k+1})``) is folded over the steps; a run
   that asks for none computes none.
3. The server forms the example-weighted mean update
   ``u = sum_i w_i (x0 - x_{K_i})`` and applies its optax optimizer to it as a
   gradient (the default ``optax.sgd(1.0)`` gives plain FedAvg, ``x <- x - u``).

How it is fast with bounded compilation:

* Batch sizes are padded up to a ladder of bucket sizes and the padding is
  masked out of the loss, so every step still averages over exactly
  ``B_int`` real examples; only a new bucket compiles a new program. Where a
  step is bound by compute (convolutions on XLA:CPU) the ladder is close
  (:func:`fine_buckets`: padding under a sixteenth); elsewhere it is coarse
  (:func:`default_buckets`: ``1, 2, 3, 4, 6, 8, 12, 16, 24, ...``).
* The number of local steps is data, not shape: clients run in blocks of
  ``client_block`` clients (``jax.vmap``), each block in chunks of
  ``steps_per_call`` unrolled steps; steps past a client's ``K_i`` are masked.
* The learning rate, the round and the client indices are traced arguments.
* Small models (a round bound by dispatch, not compute): every client's data
  lives on the devices and a block of clients runs in one compiled call that
  gathers its batches there, loops over its chunks of steps, forms the
  weighted update and, for a round of one block, applies the server update.
  The host sends only the batch plan (example indices) and a few packed
  scalars, and draws the next round's client sample and shuffles while the
  devices compute.
* Compute-bound models on XLA:CPU (convolutions, long unrolled LSTMs) run one
  client per device, their batches gathered on the host per chunk of steps:
  a compiled loop around a convolution step was measured many times slower.
  On XLA:CPU every program compiles its convolutions with XLA's own emitter,
  not YNNPACK (:func:`~fathom_tune.engine.xla_options.cpu_compiler_options`:
  1.8-4x faster steps on the EMNIST conv model); ``XLA_FLAGS`` naming the
  option overrides this.
* Every local device: the clients of a block are split over a mesh of all
  local devices (``devices=``; ``jax.shard_map`` over a ``"clients"`` axis)
  and their updates summed across it; one device runs the same code unsplit.

Per-client hyperparameters (FedEx, Khodak et al., arXiv 2106.04502, gives
every sampled client its own configuration): :meth:`Engine.run_round` also
takes a :class:`~fathom_tune.hparams.ClientHParams`. The learning rate is a
per-client traced value, ``K_i`` was already per client, and clients that
share a batch size share a block, so the compiled programs stay the same
bucketed set. An engine built with ``client_validation > 0`` holds out that
share of every client's training examples (a fixed split per seed and client)
and reports each client's validation loss before (the server model) and after
its local training; both passes count in the ledger as examples processed.
Engines without it compute none of this.

Where it lives: :class:`Engine` (here) checks its arguments, chooses the
layout and runs a round's common part (hyperparameters, the ledger, the
result); the round itself runs on one of two path objects,
:class:`~fathom_tune.engine.resident.ResidentPath` or
:class:`~fathom_tune.engine.host.HostPath`, each given a
:class:`~fathom_tune.engine.blocks.PathContext` once; the compiled programs
are in :mod:`~fathom_tune.engine.programs` and the client data in
:mod:`~fathom_tune.engine.data`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
import optax

from fathom_tune import checks
from fathom_tune.engine.blocks import PathContext, client_outputs
from fathom_tune.engine.data import ClientData
from fathom_tune.engine.hooks import ClientStatistic, LocalRate
from fathom_tune.engine.host import HostPath
from fathom_tune.engine.layout import Layout
from fathom_tune.engine.program_spec import ProgramSpec
from fathom_tune.engine.programs import describe_optimizer, programs
from fathom_tune.engine.resident import ResidentPath
from fathom_tune.engine.results import Cost, RoundResult, ServerState
from fathom_tune.engine.settings import (
    EngineSettings,
    _checked_rate,
    _checked_server_optimizer,
    _checked_share,
    _checked_statistic,
    _local_devices,
)
from fathom_tune.hparams import ClientHParams, HParams
from fathom_tune.task import Task

__all__ = ["FEDAVG_SERVER", "Engine"]

_SPLITS = ("train", "validation", "test")
FEDAVG_SERVER = optax.sgd(1.0)
"""Plain FedAvg's server step, x <- x - u: the default server optimizer (one object, so
default engines share compiled programs)."""


class Engine:
    """FedAvg on a :class:`~fathom_tune.Task` with per-round hyperparameters.

    Args:
        task: the federated task.
        seed: drives model initialisation, client sampling and client shuffling.
        server_optimizer: an optax transformation applied to the mean update
            as if it were a gradient. Default ``optax.sgd(1.0)`` (plain FedAvg).
        buckets: ascending batch-size ladder; the largest must hold the task's
            upper batch-size bound. ``None``: :func:`fine_buckets` (padding
            under a sixteenth of a step) where steps are compute-bound (models
            trained one client per device on XLA:CPU, see ``client_block``),
            else :func:`default_buckets` (fewer programs; padding is nearly
            free where a round is bound by dispatch, not compute).
        client_block: clients trained together (``jax.vmap``, split over
            ``devices``); a multiple of the number of devices. ``None`` (auto)
            trains all clients of a round at once, except on XLA:CPU for
            models with convolutions (a vmapped convolution with per-client
            kernels becomes a grouped convolution there, measured several
            times slower) and for models with long forward passes (more than
            :data:`LARGE_MODEL_EQNS` operations per example, e.g. an unrolled
            LSTM: compiled far slower vmapped), which run one client per
            device at a time (BENCHMARKS.md).
        steps_per_call: local steps unrolled into one compiled chunk; steps
            past a client's ``K_i`` in its last chunk are computed and masked.
            ``None`` (auto): 1 when clients run one per device (compute-bound
            models: no step is wasted), else 4 (dispatch-bound small models; 4
            measured faster than 8 and no slower than 2 on digits).
        eval_batch_size: batch size of evaluation (padded and masked).
        client_statistic: a :class:`ClientStatistic` every client folds over
            its local steps (FATHOM turns on its ``phi``); ``None`` computes none.
        local_rate: a :class:`LocalRate` that scales every client's learning
            rate step by step inside its local steps, from a context read off
            the server optimizer's state (FedHyper-CL); each client's
            ``report`` comes back as :attr:`RoundResult.local_rate`. ``None``
            (default): every step uses the round's learning rate, and
            nothing of a rule is computed.
        client_validation: share of each client's training examples held out
            as its validation part, in ``[0, 0.5]``: ``ceil(share * n_i)``
            examples of a fixed permutation per (seed, client) (at least one
            example stays for training). The client trains on the rest and
            the round reports its validation loss before and after local
            training (:attr:`RoundResult.validation_before` and
            ``validation_after``). 0 (default): no held-out part.
        devices: the local devices a round's clients are split over (a mesh
            over a client axis; results equal one device's within float32
            rounding). ``None``: every device of JAX's default backend
            (``jax.local_devices()``); an int: the first that many; or a
            sequence of devices. On XLA:CPU,
            ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four.
        resident_bytes: client data up to this size is kept on the devices
            once, and a block of clients is trained in one compiled call
            with its batches gathered there (the round of a small model is
            bound by dispatch, not compute); larger data, and clients run one
            per device on XLA:CPU, are gathered on the host per chunk of
            steps. Default 1 GiB.

    Rounds run two ways, with the same results up to float32 rounding:
    client data resident on the devices with a block of clients in one
    compiled call (gather, local steps, the weighted update and, for a
    round of one block, the server update), or batches gathered on the host
    per chunk of steps, which keeps a compute-bound convolution step out of a
    compiled loop (a loop over convolution steps was measured many times
    slower on XLA:CPU).

    Example:
        >>> import fathom_tune
        >>> task = fathom_tune.tasks.digits()
        >>> engine = Engine(task, seed=0)
        >>> state = engine.init()
        >>> hp = fathom_tune.HParams(learning_rate=0.1, local_epochs=1.0, batch_size=20.0)
        >>> state, result = engine.run_round(state, hp)
        >>> state.round, result.cost.rounds
        (1, 1)
    """

    def __init__(
        self,
        task: Task,
        *,
        seed: int = 0,
        server_optimizer: optax.GradientTransformation | None = None,
        buckets: Sequence[int] | None = None,
        client_block: int | None = None,
        steps_per_call: int | None = None,
        eval_batch_size: int = 256,
        client_statistic: ClientStatistic | None = None,
        local_rate: LocalRate | None = None,
        client_validation: float = 0.0,
        devices: int | Sequence | None = None,
        resident_bytes: int = 1 << 30,
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
        self.task = task
        self.seed = int(checks.seed("seed", seed))
        self.client_statistic = _checked_statistic(client_statistic)
        self.server_optimizer = _checked_server_optimizer(server_optimizer, FEDAVG_SERVER)
        self.clients_per_round = task.clients_per_round
        self.eval_batch_size = checks.positive_int("eval_batch_size", eval_batch_size)
        self.local_rate = _checked_rate(local_rate, self.server_optimizer, task)
        self.client_validation = _checked_share(client_validation)
        self._data = ClientData(task, self.seed, self.client_validation)
        self.devices = _local_devices(devices)
        layout = Layout.choose(
            task.model, self._data, self.devices, self.clients_per_round, task.bounds.upper.batch_int,
            client_block, resident_bytes, steps_per_call, buckets,
        )
        self.client_block, self.steps_per_call, self.buckets = layout.client_block, layout.steps_per_call, layout.buckets
        self.resident, self.resident_bytes = layout.resident, layout.resident_bytes
        spec = ProgramSpec(
            task.model, self.server_optimizer, self.client_block, self.steps_per_call, client_statistic,
            self.local_rate, self.devices,
        )
        self._programs = programs(spec)
        self._param_shapes = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        self.param_bytes = int(
            sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self._param_shapes))
        )
        self._settings: EngineSettings | None = None
        self._path_ctx = self._path_context()
        self._path = (ResidentPath if self.resident else HostPath)(self._path_ctx)

    def _path_context(self) -> PathContext:
        """What the round path is given (it reads nothing else of the engine)."""
        data = self._data
        return PathContext(
            programs=self._programs,
            seed=self.seed,
            sizes=data.sizes,
            held=data.held,
            examples=data.examples,
            validation=data.validation,
            example_bytes=data.example_bytes,
            buckets=self.buckets,
            steps_per_call=self.steps_per_call,
            client_block=self.client_block,
            clients_per_round=self.clients_per_round,
            statistic_start=0.0 if self.client_statistic is None else float(self.client_statistic.initial),
            local_rate=self.local_rate is not None,
            validate=self.client_validation > 0.0,
            most_epochs=self.task.bounds.upper.local_epochs,
        )

    @property
    def settings(self) -> EngineSettings:
        """This engine's :class:`EngineSettings` (computed once, on first use)."""
        if self._settings is None:
            self._settings = EngineSettings(
                server_optimizer=describe_optimizer(self.server_optimizer, self._param_shapes),
                buckets=self.buckets,
                client_block=self.client_block,
                steps_per_call=self.steps_per_call,
                eval_batch_size=self.eval_batch_size,
                client_statistic=getattr(self.client_statistic, "name", None),
                client_validation=self.client_validation,
                devices=len(self.devices),
                local_rate=None if self.local_rate is None else str(self.local_rate.name),
            )
        return self._settings

    # ----------------------------------------------------------------- programs
    @property
    def compile_count(self) -> int:
        """Programs compiled so far for this engine's configuration.

        Engines with the same model, server optimizer, ``client_block`` and
        ``steps_per_call`` share their compiled programs and this count.
        """
        return sum(self._programs.compiles.values())

    @property
    def compile_counts(self) -> dict[str, int]:
        """Compiled programs per kind, e.g. ``{"local_steps": 3, "server_update": 1}``."""
        return dict(self._programs.compiles)

    # ------------------------------------------------------------------- state
    def init(self) -> ServerState:
        """The initial server state: model parameters from ``seed``, round 0."""
        params = self._programs.init(jax.random.PRNGKey(self.seed))
        return ServerState(params=params, opt_state=self.server_optimizer.init(params), round=0)

    def client_split(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of client ``index``'s examples that it trains on, and its validation part.

        ``index``: the client's position in ``task.train.client_ids()``. The
        validation part is the first ``ceil(client_validation * n)`` of a
        permutation drawn from ``(seed, index)``; without ``client_validation``
        every example trains.
        """
        return self._data.split(index)

    # ------------------------------------------------------------------- round
    def run_round(
        self, state: ServerState, hparams: HParams | ClientHParams
    ) -> tuple[ServerState, RoundResult]:
        """Runs round ``state.round``; returns the next state and the result.

        Args:
            state: the server state.
            hparams: the round's hyperparameters: an :class:`HParams` for every
                client, or a :class:`~fathom_tune.hparams.ClientHParams` with one
                per sampled client, in the order of :meth:`sampled`.
        """
        per_client = self._per_client(state, hparams)
        t0 = time.perf_counter()
        rnd = state.round
        draws = self._path.draws(rnd, per_client or hparams)
        sizes = self._data.sizes[draws.sampled]
        if per_client:
            etas = np.array([hp.learning_rate for hp in per_client], np.float32)
        else:
            etas = np.full(len(sizes), hparams.learning_rate, np.float32)
        weights = sizes / sizes.sum()
        new_params, opt_state, u, pending = self._path.train(state, draws, etas, weights)
        # The server optimizer's scalars (a step count, FATHOM's H) are copied to the
        # host while the round computes: a schedule that reads one does not wait then.
        for leaf in jax.tree_util.tree_leaves(opt_state):
            if getattr(leaf, "ndim", None) == 0 and hasattr(leaf, "copy_to_host_async"):
                leaf.copy_to_host_async()
        self._path.draw_ahead(rnd + 1, None if per_client else hparams)
        validate = self.client_validation > 0.0
        held = self._data.held[draws.sampled]
        out = client_outputs(pending, draws.steps, held, self._path_ctx)
        jax.block_until_ready(new_params)
        cost = Cost.of_round(
            draws.steps,
            draws.b_ints,
            model_bytes=self.param_bytes,
            reply_scalar_bytes=12 + (8 if validate else 0),
            extra_examples=2 * int(held.sum()) if validate else 0,
            seconds=time.perf_counter() - t0,
        )
        result = RoundResult(
            round=rnd,
            hparams=hparams.summary if per_client else hparams,
            client_ids=tuple(self._data.ids[i] for i in draws.sampled),
            num_examples=sizes.copy(),
            local_steps=draws.steps,
            statistic=None if self.client_statistic is None else out["statistic"],
            client_loss=out["loss"],
            train_loss=float(np.dot(weights, out["loss"])),
            update=u,
            cost=cost,
            client_hparams=per_client,
            validation_before=out["before"] if validate else None,
            validation_after=out["after"] if validate else None,
            validation_size=held.copy() if validate else None,
            opt_state=opt_state,
            local_rate=None if self.local_rate is None else out["rate"],
        )
        return ServerState(params=new_params, opt_state=opt_state, round=rnd + 1), result

    def _per_client(self, state, hparams) -> tuple[HParams, ...] | None:
        """The round's per-client hyperparameters (None for one :class:`HParams`), checked."""
        if not isinstance(state, ServerState):
            raise TypeError(f"state must be a ServerState, got {type(state).__name__}")
        if isinstance(hparams, ClientHParams):
            if len(hparams.clients) != self.clients_per_round:
                raise ValueError(
                    f"hparams holds {len(hparams.clients)} clients' hyperparameters; this task "
                    f"samples {self.clients_per_round} clients per round"
                )
            return hparams.clients
        if isinstance(hparams, HParams):
            return None
        raise TypeError(f"hparams must be an HParams or a ClientHParams, got {type(hparams).__name__}")

    def sampled(self, round_index: int) -> np.ndarray:
        """Indices (into ``task.train.client_ids()``) of the clients of round ``round_index``."""
        return self._path_ctx.sampled(round_index)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, params, split: str = "validation") -> dict[str, float]:
        """The model's ``eval_metrics`` pooled over every example of ``split``.

        Args:
            params: model parameters (e.g. ``state.params``).
            split: ``"validation"``, ``"test"`` or ``"train"``.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        out = self._programs.evaluate(params, self._data.pooled(split, self.eval_batch_size))
        return {k: float(v) for k, v in out.items()}
