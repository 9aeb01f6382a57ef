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
  not YNNPACK (``_xla_options.cpu_compiler_options``: 1.8-4x faster steps on the
  EMNIST conv model); ``XLA_FLAGS`` naming the option overrides this.
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
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_tune import checks
from fathom_tune.engine.batching import (
    default_buckets,
    fine_buckets,
    sample_clients,
)
from fathom_tune.engine.hooks import ClientStatistic, LocalRate
from fathom_tune.engine.programs import (
    LARGE_MODEL_EQNS,
    count_eqns,
    describe_optimizer,
    programs,
)
from fathom_tune.engine.results import Cost, RoundResult, ServerState
from fathom_tune.engine.round_paths import _RoundPaths
from fathom_tune.engine.settings import EngineSettings, _checked_rate, _local_devices
from fathom_tune.hparams import ClientHParams, HParams
from fathom_tune.task import Task

__all__ = ["FEDAVG_SERVER", "Engine"]

_SPLITS = ("train", "validation", "test")
FEDAVG_SERVER = optax.sgd(1.0)
"""Plain FedAvg's server step, x <- x - u: the default server optimizer (one object, so
default engines share compiled programs)."""


class Engine(_RoundPaths):
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
        seed = checks.seed("seed", seed)
        if client_statistic is not None and not callable(getattr(client_statistic, "update", None)):
            raise TypeError(
                "client_statistic must be None or a ClientStatistic (with name, initial and "
                f"update), got {client_statistic!r}"
            )
        if server_optimizer is None:
            server_optimizer = FEDAVG_SERVER
        if not isinstance(server_optimizer, optax.GradientTransformation):
            raise TypeError(
                "server_optimizer must be an optax.GradientTransformation, "
                f"got {type(server_optimizer).__name__}"
            )
        self.task = task
        self.seed = int(seed)
        self.server_optimizer = server_optimizer
        self.clients_per_round = task.clients_per_round
        self.eval_batch_size = checks.positive_int("eval_batch_size", eval_batch_size)
        self.client_statistic = client_statistic
        self.local_rate = _checked_rate(local_rate, server_optimizer, task)
        if isinstance(client_validation, bool) or not isinstance(client_validation, (int, float, np.floating)):
            raise TypeError(f"client_validation must be a float in [0, 0.5], got {client_validation!r}")
        if not 0.0 <= float(client_validation) <= 0.5:
            raise ValueError(f"client_validation must be in [0, 0.5], got {client_validation!r}")
        self.client_validation = float(client_validation)

        self._client_ids = tuple(task.train.client_ids())
        full_sizes = np.array([task.train.client_size(c) for c in self._client_ids])
        self._held_sizes = np.array([self._held_out(int(n)) for n in full_sizes], dtype=np.int64)
        self._client_sizes = full_sizes - self._held_sizes
        self._examples: dict[int, Mapping[str, np.ndarray]] = {}
        self._validation: dict[int, Mapping[str, np.ndarray]] = {}
        self.devices = _local_devices(devices)
        n_dev = len(self.devices)
        cpu_kind = self._cpu_kind() if jax.default_backend() == "cpu" else None
        one_at_a_time = cpu_kind is not None
        if client_block is None:
            client_block = n_dev if one_at_a_time else -(-self.clients_per_round // n_dev) * n_dev
        block = checks.positive_int("client_block", client_block)
        if block % n_dev:
            raise ValueError(
                f"client_block must be a multiple of the {n_dev} devices the clients are split over, "
                f"got {block}; pass devices=1 to train on one device"
            )
        self.client_block = min(block, -(-self.clients_per_round // n_dev) * n_dev)
        per_device = self.client_block // n_dev
        self.resident_bytes = checks.positive_int("resident_bytes", resident_bytes)
        self.resident = self._fits_on_devices(per_device)
        if steps_per_call is None:
            # One client per device: compute-bound, no step wasted. Resident: the
            # compiled loop runs only the chunks needed, 1 step each measured no
            # slower than 2-8 on digits. Gathered on the host: 4 per call.
            steps_per_call = 1 if per_device == 1 or self.resident else 4
        self.steps_per_call = checks.positive_int("steps_per_call", steps_per_call)
        if buckets is None:
            # Close buckets where a step is compute-bound and compiles fast (convolutions);
            # the LSTM's programs compile for tens of seconds each, so it keeps the
            # coarse ladder.
            buckets = fine_buckets() if cpu_kind == "conv" and per_device == 1 else default_buckets()
        buckets = tuple(buckets)
        if not buckets or any(
            isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in buckets
        ) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be strictly ascending ints >= 1, got {buckets!r}")
        widest = task.bounds.upper.batch_int
        if buckets[-1] < widest:
            raise ValueError(
                f"buckets: the largest bucket {buckets[-1]} is smaller than the batch size "
                f"{widest} that task.bounds allows; the largest bucket must be >= {widest}"
            )
        self.buckets = tuple(int(b) for b in buckets)
        self._resident: dict | None = None
        self._zero_update = None
        self._rungs: dict[int, int] = {}  # bucket -> chunks its plans hold
        self._ahead = None  # the next round's draws (_round_paths._Ahead), made while one computes
        self._eval_batches: dict[str, list] = {}
        self._programs = programs(
            task.model,
            server_optimizer,
            self.client_block,
            self.steps_per_call,
            client_statistic,
            self.local_rate,
            self.devices,
        )
        self._param_shapes = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        self.param_bytes = int(
            sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self._param_shapes))
        )
        self._settings: EngineSettings | None = None

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

    def _cpu_kind(self) -> str | None:
        """Whether XLA:CPU should train this model one client at a time, and why:
        ``"conv"``, ``"long"`` or None (no: vmap the clients).

        Yes for convolutions (see ``client_block``) and for models whose
        forward pass on one example is longer than :data:`LARGE_MODEL_EQNS`
        operations, such as FedJAX's statically unrolled LSTMs: vmapping
        them over clients multiplied compile time and slowed each round
        (small Shakespeare, BENCHMARKS.md: 102 s to compile one bucket with
        10 clients vmapped and 8 steps per call, 28 s one client at a time).
        """
        model = self.task.model
        sample = {k: v[:1] for k, v in self._client_examples(0).items()}
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        jaxpr = jax.make_jaxpr(model.apply_for_train)(params, sample, jax.random.PRNGKey(0))
        if "conv_general_dilated" in str(jaxpr):
            return "conv"
        return "long" if count_eqns(jaxpr.jaxpr) > LARGE_MODEL_EQNS else None

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

    def _held_out(self, n: int) -> int:
        """Validation examples held out of a client with ``n`` training examples."""
        if self.client_validation == 0.0 or n < 2:
            return 0
        return min(math.ceil(self.client_validation * n), n - 1)

    def client_split(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of client ``index``'s examples that it trains on, and its validation part.

        ``index``: the client's position in ``task.train.client_ids()``. The
        validation part is the first ``ceil(client_validation * n)`` of a
        permutation drawn from ``(seed, index)``; without ``client_validation``
        every example trains.
        """
        n = int(self._client_sizes[index] + self._held_sizes[index])
        held = int(self._held_sizes[index])
        if held == 0:
            return np.arange(n), np.arange(0)
        perm = np.random.default_rng(np.random.SeedSequence([self.seed, index, 0xC1])).permutation(n)
        return np.sort(perm[held:]), np.sort(perm[:held])

    def _client_examples(self, index: int) -> Mapping[str, np.ndarray]:
        ex = self._examples.get(index)
        if ex is None:
            ds = self.task.train.get_client(self._client_ids[index])
            ex = {k: np.asarray(v) for k, v in ds.all_examples().items()}
            if self.client_validation > 0.0:
                train, val = self.client_split(index)
                self._validation[index] = {k: v[val] for k, v in ex.items()}
                ex = {k: v[train] for k, v in ex.items()}
            self._examples[index] = ex
        return ex

    def _client_validation(self, index: int) -> Mapping[str, np.ndarray]:
        self._client_examples(index)
        return self._validation[index]

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
        if not isinstance(state, ServerState):
            raise TypeError(f"state must be a ServerState, got {type(state).__name__}")
        if isinstance(hparams, ClientHParams):
            if len(hparams.clients) != self.clients_per_round:
                raise ValueError(
                    f"hparams holds {len(hparams.clients)} clients' hyperparameters; this task "
                    f"samples {self.clients_per_round} clients per round"
                )
            per_client = hparams.clients
        elif isinstance(hparams, HParams):
            per_client = None
        else:
            raise TypeError(f"hparams must be an HParams or a ClientHParams, got {type(hparams).__name__}")
        t0 = time.perf_counter()
        rnd = state.round
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.round != rnd:
            ahead = None
        sampled = ahead.sampled if ahead is not None else self.sampled(rnd)
        sizes = self._client_sizes[sampled]
        steps, b_ints = self._client_steps(per_client or hparams, sizes)
        if per_client:
            etas = np.array([hp.learning_rate for hp in per_client], np.float32)
        else:
            etas = np.full(len(sampled), hparams.learning_rate, np.float32)
        weights_all = sizes / sizes.sum()
        validate = self.client_validation > 0.0

        if ahead is not None and np.array_equal(ahead.steps, steps) and np.array_equal(ahead.b_ints, b_ints):
            blocks = ahead.blocks  # drawn ahead with its batch plans
        else:
            blocks = self._blocks(steps, b_ints)
        stat0 = 0.0 if self.client_statistic is None else float(self.client_statistic.initial)
        stat = np.full(len(sampled), stat0, np.float64)
        loss = np.zeros(len(sampled), np.float64)
        val_before = np.zeros(len(sampled), np.float64)
        val_after = np.zeros(len(sampled), np.float64)
        rate = np.zeros(len(sampled), np.float64)
        resident = self._resident_data() is not None
        args = (state, blocks, sampled, steps, b_ints, etas, weights_all, stat0, validate)
        if resident:
            new_params, opt_state, u, pending = self._resident_blocks(*args, ahead)
        else:
            new_params, opt_state, u, pending = self._host_blocks(*args)
        # The server optimizer's scalars (a step count, FATHOM's H) are copied to the
        # host while the round computes: a schedule that reads one does not wait then.
        for leaf in jax.tree_util.tree_leaves(opt_state):
            if getattr(leaf, "ndim", None) == 0 and hasattr(leaf, "copy_to_host_async"):
                leaf.copy_to_host_async()
        if resident:
            self._draw_ahead(rnd + 1, None if per_client else hparams)
        held = self._held_sizes[sampled]
        for members, out in pending:
            out = np.asarray(out)[:, : len(members)]  # statistic, loss, validation before, after, rate
            stat[members] = out[0]
            loss[members] = out[1] / steps[members]
            rate[members] = out[4]
            if validate:
                n_val = np.maximum(held[members], 1)
                val_before[members] = out[2] / n_val
                val_after[members] = out[3] / n_val
        jax.block_until_ready(new_params)
        seconds = time.perf_counter() - t0
        n_clients = len(sampled)
        trained = int(np.dot(steps, b_ints))
        cost = Cost(
            rounds=1,
            examples=trained + (2 * int(held.sum()) if validate else 0),
            steps=int(steps.sum()),
            bytes_down=n_clients * self.param_bytes,
            bytes_up=n_clients * (self.param_bytes + 12 + (8 if validate else 0)),
            seconds=seconds,
        )
        result = RoundResult(
            round=rnd,
            hparams=hparams.summary if per_client else hparams,
            client_ids=tuple(self._client_ids[i] for i in sampled),
            num_examples=sizes.copy(),
            local_steps=steps,
            statistic=None if self.client_statistic is None else stat,
            client_loss=loss,
            train_loss=float(np.dot(weights_all, loss)),
            update=u,
            cost=cost,
            client_hparams=per_client,
            validation_before=val_before if validate else None,
            validation_after=val_after if validate else None,
            validation_size=held.copy() if validate else None,
            opt_state=opt_state,
            local_rate=None if self.local_rate is None else rate,
        )
        return ServerState(params=new_params, opt_state=opt_state, round=rnd + 1), result

    def sampled(self, round_index: int) -> np.ndarray:
        """Indices (into ``task.train.client_ids()``) of the clients of round ``round_index``."""
        return sample_clients(self.seed, round_index, len(self._client_ids), self.clients_per_round)

    def _blocks(self, steps: np.ndarray, b_ints: np.ndarray) -> list[np.ndarray]:
        """The round's clients in blocks of at most ``client_block`` with one batch size each,
        clients with similar ``K_i`` together."""
        if (b_ints == b_ints[0]).all():
            order = np.argsort(-steps, kind="stable")
            return [order[i : i + self.client_block] for i in range(0, len(order), self.client_block)]
        out = []
        for b in np.unique(b_ints):
            group = np.flatnonzero(b_ints == b)
            group = group[np.argsort(-steps[group], kind="stable")]
            out.extend(group[i : i + self.client_block] for i in range(0, len(group), self.client_block))
        return out

    # -------------------------------------------------------------- evaluation
    def evaluate(self, params, split: str = "validation") -> dict[str, float]:
        """The model's ``eval_metrics`` pooled over every example of ``split``.

        Args:
            params: model parameters (e.g. ``state.params``).
            split: ``"validation"``, ``"test"`` or ``"train"``.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        batches = self._eval_batches.get(split)
        if batches is None:
            batches = self._eval_batches[split] = self._pooled_batches(getattr(self.task, split))
        out = self._programs.evaluate(params, batches)
        return {k: float(v) for k, v in out.items()}

    def _pooled_batches(self, fd: fedjax.FederatedData):
        parts = [ds.all_examples() for _, ds in fd.clients()]
        pooled = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        n = len(next(iter(pooled.values())))
        size = min(self.eval_batch_size, n)
        nb = -(-n // size)
        out = {}
        for k, v in pooled.items():
            buf = np.zeros((nb * size,) + v.shape[1:], v.dtype)
            buf[:n] = v
            out[k] = jnp.asarray(buf.reshape((nb, size) + v.shape[1:]))
        mask = np.zeros(nb * size, bool)
        mask[:n] = True
        out[fedjax.EXAMPLE_MASK_KEY] = jnp.asarray(mask.reshape(nb, size))
        return out
