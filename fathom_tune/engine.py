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

* Batch sizes are padded up to a small ladder of bucket sizes
  (``1, 2, 3, 4, 6, 8, 12, 16, 24, ...``) and the padding is masked out of the
  loss, so every step still averages over exactly ``B_int`` real examples;
  only a new bucket compiles a new program.
* The number of local steps is data, not shape: clients run in blocks of
  ``client_block`` clients (``jax.vmap``), each block in chunks of
  ``steps_per_call`` unrolled steps; steps past a client's ``K_i`` are masked.
* The learning rate, the round and the client indices are traced arguments.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_tune import checks
from fathom_tune._programs import (
    LARGE_MODEL_EQNS,
    ClientStatistic,
    count_eqns,
    describe_optimizer,
    programs,
)
from fathom_tune._rounds import (
    Cost,
    RoundResult,
    ServerState,
    batch_indices,
    bucket_size,
    client_rng,
    default_buckets,
    sample_clients,
)
from fathom_tune.hparams import HParams
from fathom_tune.task import Task

__all__ = [
    "LARGE_MODEL_EQNS",
    "ClientStatistic",
    "Cost",
    "Engine",
    "EngineSettings",
    "RoundResult",
    "ServerState",
    "batch_indices",
    "bucket_size",
    "client_rng",
    "default_buckets",
    "describe_optimizer",
    "sample_clients",
]

_SPLITS = ("train", "validation", "test")
_FEDAVG_SERVER = optax.sgd(1.0)  # one object, so default engines share programs


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything about an engine that changes its results besides task and seed.

    A frozen, comparable value: checkpoints store it and a resume with other
    settings is refused with the field that differs.

    Attributes:
        server_optimizer: the server optimizer as its behaviour: a digest of
            the updates it makes on a fixed probe (so ``optax.adam(1e-3)`` and
            ``optax.adam(1e-2)`` differ although both are ``adam``).
        buckets: the batch-size ladder.
        client_block: clients trained together.
        steps_per_call: local steps per compiled call.
        eval_batch_size: evaluation batch size.
        client_statistic: the client statistic's name, or None.
    """

    server_optimizer: str
    buckets: tuple[int, ...]
    client_block: int
    steps_per_call: int
    eval_batch_size: int
    client_statistic: str | None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Engine:
    """FedAvg on a :class:`~fathom_tune.Task` with per-round hyperparameters.

    Args:
        task: the federated task.
        seed: drives model initialisation, client sampling and client shuffling.
        server_optimizer: an optax transformation applied to the mean update
            as if it were a gradient. Default ``optax.sgd(1.0)`` (plain FedAvg).
        buckets: ascending batch-size ladder (see :func:`default_buckets`);
            the largest must hold the task's upper batch-size bound.
        client_block: clients trained together with ``jax.vmap``. ``None``
            (auto) trains all clients of a round at once, except on XLA:CPU
            for models with convolutions (a vmapped convolution with
            per-client kernels becomes a grouped convolution there, measured
            several times slower) and for models with long forward passes
            (more than :data:`LARGE_MODEL_EQNS` operations per example, e.g.
            an unrolled LSTM: compiled far slower vmapped), which run one
            client at a time (BENCHMARKS.md).
        steps_per_call: local steps unrolled into one compiled call; steps
            past a client's ``K_i`` in its last call are computed and masked.
            ``None`` (auto): 1 when clients run one at a time (compute-bound
            models: no step is wasted), else 4 (dispatch-bound small models; 4
            measured faster than 8 and no slower than 2 on digits).
        eval_batch_size: batch size of evaluation (padded and masked).
        client_statistic: a :class:`ClientStatistic` every client folds over
            its local steps (FATHOM turns on its ``phi``); ``None`` computes none.

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
            server_optimizer = _FEDAVG_SERVER
        if not isinstance(server_optimizer, optax.GradientTransformation):
            raise TypeError(
                "server_optimizer must be an optax.GradientTransformation, "
                f"got {type(server_optimizer).__name__}"
            )
        buckets = tuple(default_buckets() if buckets is None else buckets)
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
        self.task = task
        self.seed = int(seed)
        self.server_optimizer = server_optimizer
        self.buckets = tuple(int(b) for b in buckets)
        self.clients_per_round = task.clients_per_round
        self.eval_batch_size = checks.positive_int("eval_batch_size", eval_batch_size)
        self.client_statistic = client_statistic

        self._client_ids = tuple(task.train.client_ids())
        self._client_sizes = np.array([task.train.client_size(c) for c in self._client_ids])
        self._examples: dict[int, Mapping[str, np.ndarray]] = {}
        if client_block is None:
            one_at_a_time = jax.default_backend() == "cpu" and self._one_at_a_time_on_cpu()
            client_block = 1 if one_at_a_time else self.clients_per_round
        block = checks.positive_int("client_block", client_block)
        self.client_block = min(block, self.clients_per_round)
        if steps_per_call is None:
            steps_per_call = 1 if self.client_block == 1 else 4
        self.steps_per_call = checks.positive_int("steps_per_call", steps_per_call)
        self._eval_batches: dict[str, list] = {}
        self._programs = programs(
            task.model, server_optimizer, self.client_block, self.steps_per_call, client_statistic
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
            )
        return self._settings

    def _one_at_a_time_on_cpu(self) -> bool:
        """Whether XLA:CPU should train this model one client at a time.

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
        return "conv_general_dilated" in str(jaxpr) or count_eqns(jaxpr.jaxpr) > LARGE_MODEL_EQNS

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

    def _client_examples(self, index: int) -> Mapping[str, np.ndarray]:
        ex = self._examples.get(index)
        if ex is None:
            ds = self.task.train.get_client(self._client_ids[index])
            ex = {k: np.asarray(v) for k, v in ds.all_examples().items()}
            self._examples[index] = ex
        return ex

    # ------------------------------------------------------------------- round
    def run_round(self, state: ServerState, hparams: HParams) -> tuple[ServerState, RoundResult]:
        """Runs round ``state.round`` with ``hparams``; returns the next state and the result."""
        if not isinstance(state, ServerState):
            raise TypeError(f"state must be a ServerState, got {type(state).__name__}")
        if not isinstance(hparams, HParams):
            raise TypeError(f"hparams must be an HParams, got {type(hparams).__name__}")
        t0 = time.perf_counter()
        rnd = state.round
        sampled = sample_clients(self.seed, rnd, len(self._client_ids), self.clients_per_round)
        sizes = self._client_sizes[sampled]
        b_int = hparams.batch_int
        steps = np.array([hparams.local_steps(int(n)) for n in sizes])
        bucket = bucket_size(b_int, self.buckets)
        ex_mask = np.zeros(bucket, np.float32)
        ex_mask[:b_int] = 1.0
        eta = np.float32(hparams.learning_rate)
        inv_b = np.float32(1.0 / b_int)
        weights_all = sizes / sizes.sum()

        x0 = state.params
        u = self._programs.zeros(x0)
        p_block, s_call = self.client_block, self.steps_per_call
        order = np.argsort(-steps, kind="stable")  # similar K in one block
        stat0 = 0.0 if self.client_statistic is None else float(self.client_statistic.initial)
        stat = np.full(len(sampled), stat0, np.float64)
        loss = np.zeros(len(sampled), np.float64)
        pending = []
        for start in range(0, len(order), p_block):
            members = order[start : start + p_block]
            k_block = int(steps[members].max())
            n_calls = -(-k_block // s_call)
            plans = [
                self._batch_plan(int(sampled[m]), rnd, int(steps[m]), b_int, n_calls * s_call, bucket)
                for m in members
            ]
            params = self._programs.broadcast(x0)
            stat_b = np.full(p_block, stat0, np.float32)
            loss_b = np.zeros(p_block, np.float32)
            cidx = np.zeros(p_block, np.int32)
            cidx[: len(members)] = sampled[members]
            active_all = np.zeros((p_block, n_calls * s_call), bool)
            for j, m in enumerate(members):
                active_all[j, : steps[m]] = True
            for call in range(n_calls):
                sl = slice(call * s_call, (call + 1) * s_call)
                batches = self._gather(members, sampled, plans, sl, p_block)
                params, stat_b, loss_b = self._programs.local_steps(
                    x0, params, stat_b, loss_b, batches, ex_mask, active_all[:, sl],
                    self.seed, rnd, cidx, call * s_call, eta, inv_b,
                )
            w = np.zeros(p_block, np.float32)
            w[: len(members)] = weights_all[members]
            u = self._programs.accumulate(u, x0, params, w)
            pending.append((members, stat_b, loss_b))
        new_params, opt_state = self._programs.server_update(x0, state.opt_state, u)
        for members, stat_b, loss_b in pending:
            stat[members] = np.asarray(stat_b)[: len(members)]
            loss[members] = np.asarray(loss_b)[: len(members)] / steps[members]
        jax.block_until_ready(new_params)
        seconds = time.perf_counter() - t0
        n_clients = len(sampled)
        cost = Cost(
            rounds=1,
            examples=int(steps.sum()) * b_int,
            steps=int(steps.sum()),
            bytes_down=n_clients * self.param_bytes,
            bytes_up=n_clients * (self.param_bytes + 12),
            seconds=seconds,
        )
        result = RoundResult(
            round=rnd,
            hparams=hparams,
            client_ids=tuple(self._client_ids[i] for i in sampled),
            num_examples=sizes.copy(),
            local_steps=steps,
            statistic=None if self.client_statistic is None else stat,
            client_loss=loss,
            train_loss=float(np.dot(weights_all, loss)),
            update=u,
            cost=cost,
        )
        return ServerState(params=new_params, opt_state=opt_state, round=rnd + 1), result

    def _batch_plan(self, client: int, rnd: int, k: int, b_int: int, total_steps: int, bucket: int):
        """Example indices ``[total_steps, bucket]`` of one client: shuffle, repeat.

        The first ``k`` rows hold ``b_int`` real indices each, drawn from
        consecutive passes over a fresh permutation per epoch; padding slots and
        the rows of inactive steps point at example 0 and are masked.
        """
        rng = client_rng(self.seed, rnd, client)
        plan = np.zeros((total_steps, bucket), np.int64)
        plan[:k, :b_int] = batch_indices(int(self._client_sizes[client]), k, b_int, rng)
        return plan

    def _gather(self, members, sampled, plans, sl, p_block):
        first = self._client_examples(int(sampled[members[0]]))
        out = {}
        for key, arr in first.items():
            shape = (p_block,) + plans[0][sl].shape + arr.shape[1:]
            buf = np.zeros(shape, arr.dtype)
            for j, m in enumerate(members):
                buf[j] = self._client_examples(int(sampled[m]))[key][plans[j][sl]]
            if len(members) < p_block:
                buf[len(members) :] = buf[0]
            out[key] = buf
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
