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
   During these steps it keeps ``phi_i = min_k cos(g_k, x0 - x_{k+1})``.
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
import functools
import math
import operator
import time
from collections.abc import Mapping, Sequence

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_tune._hparams import HParams
from fathom_tune._hypergrad import local_hypergradient, safe_cosine
from fathom_tune.task import Task, check_positive_int

__all__ = [
    "Cost",
    "Engine",
    "RoundResult",
    "ServerState",
    "bucket_size",
    "default_buckets",
    "sample_clients",
]

_SPLITS = ("train", "validation", "test")
_FEDAVG_SERVER = optax.sgd(1.0)  # one object, so default engines share programs


def default_buckets(max_size: int = 1 << 16) -> tuple[int, ...]:
    """The batch-size ladder: 1, 2, 3, then ``2^k`` and ``3 * 2^(k-1)``.

    Consecutive buckets differ by at most 1.5x, so padding costs at most a third
    of a step's compute; a batch size drifting from 4 to 256 meets 13 buckets.

    >>> default_buckets(64)
    (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    """
    out = {1, 2, 3}
    k = 2
    while (1 << k) <= max_size:
        out.add(1 << k)
        if 3 << (k - 1) <= max_size:
            out.add(3 << (k - 1))
        k += 1
    return tuple(sorted(out))


def bucket_size(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``batch``.

    >>> bucket_size(20, default_buckets()), bucket_size(24, default_buckets())
    (24, 24)
    """
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"batch size {batch} exceeds the largest bucket {buckets[-1]}")


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
    """Indices of the ``k`` clients of round ``round_index``: a function of (seed, round).

    >>> list(sample_clients(0, 3, 10, 4)) == list(sample_clients(0, 3, 10, 4))
    True
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, 0x5A]))
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def _client_rng(seed: int, round_index: int, client_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, round_index, client_index, 0xB5]))


@dataclasses.dataclass(frozen=True)
class Cost:
    """What training consumed: one round's, or a sum over rounds or trials.

    Attributes:
        rounds: communication rounds.
        examples: client examples processed (one per example in every local
            gradient, i.e. ``sum_i K_i * B_int``).
        steps: local SGD steps, ``sum_i K_i``.
        bytes_down: server to clients: the model, once per sampled client.
        bytes_up: clients to server: each client's update plus three float32
            scalars (its example count, training loss and ``phi_i``).
        seconds: wall-clock seconds.
    """

    rounds: int = 0
    examples: int = 0
    steps: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ServerState:
    """The server's model and optimizer state after ``round`` rounds."""

    params: object
    opt_state: object
    round: int = 0


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What one round produced, including what FATHOM needs.

    Attributes:
        round: the round's index (0-based).
        hparams: the hyperparameters the round used.
        client_ids: the sampled clients.
        num_examples: ``n_i`` of each sampled client.
        local_steps: ``K_i`` of each sampled client.
        phi: ``min_k cos(g_k, x0 - x_{k+1})`` of each sampled client.
        client_loss: each client's mean minibatch loss over its local steps.
        train_loss: example-weighted mean of ``client_loss``.
        local_hypergradient: ``G = sum_i w_i phi_i`` with ``w_i = n_i / sum n``.
        update: the weighted mean update ``u`` (gradient-signed pytree).
        cost: what this round consumed.
    """

    round: int
    hparams: HParams
    client_ids: tuple
    num_examples: np.ndarray
    local_steps: np.ndarray
    phi: np.ndarray
    client_loss: np.ndarray
    train_loss: float
    local_hypergradient: float
    update: object
    cost: Cost

    @property
    def finite(self) -> bool:
        """Whether the loss and the update are finite (no divergence)."""
        if not math.isfinite(self.train_loss):
            return False
        return bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(self.update)))


class _Programs:
    """The jitted programs of one (model, server optimizer, block, chunk) configuration.

    Shared by every engine with that configuration (e.g. all trials of a
    baseline study on one task), so a new engine compiles nothing new.
    """

    def __init__(self, model, server_optimizer, client_block: int, steps_per_call: int):
        self.compiles: dict[str, int] = {}
        self.client_block = client_block
        self.server_optimizer = server_optimizer
        steps = steps_per_call

        def one_step(x0, params, phi, loss_sum, batch, ex_mask, on, step_key, eta, inv_b):
            def loss_fn(p):
                preds = model.apply_for_train(p, batch, step_key)
                return jnp.sum(model.train_loss(batch, preds) * ex_mask) * inv_b

            loss, g = jax.value_and_grad(loss_fn)(params)
            new = jax.tree_util.tree_map(lambda p, gi: p - eta * gi, params, g)
            c = safe_cosine(g, jax.tree_util.tree_map(jnp.subtract, x0, new))
            params = jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new, params)
            phi = jnp.where(on, jnp.minimum(phi, c), phi)
            return params, phi, loss_sum + jnp.where(on, loss, 0.0)

        def block_step(x0, carry, batch, ex_mask, on, keys, eta, inv_b):
            """One local step of every client of the block; ``on[j]``: client j still runs."""
            params, phi, loss_sum = carry
            if self.client_block == 1:
                # No vmap: a vmapped convolution with per-client kernels becomes a
                # grouped convolution, several times slower on XLA:CPU.
                first = functools.partial(jax.tree_util.tree_map, operator.itemgetter(0))
                out = one_step(
                    x0, first(params), phi[0], loss_sum[0], first(batch), ex_mask, on[0], keys[0], eta, inv_b
                )
                return jax.tree_util.tree_map(lambda a: a[None], out)
            return jax.vmap(one_step, in_axes=(None, 0, 0, 0, 0, None, 0, 0, None, None))(
                x0, params, phi, loss_sum, batch, ex_mask, on, keys, eta, inv_b
            )

        def local_steps(x0, params, phi, loss_sum, batches, ex_mask, active, seed, rnd, cidx, step0, eta, inv_b):
            self._count("local_steps")
            base = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
            keys = jax.vmap(lambda c: jax.random.fold_in(base, c))(cidx)
            carry = (params, phi, loss_sum)
            for s in range(steps):  # unrolled: see the module docstring
                batch = jax.tree_util.tree_map(operator.itemgetter((slice(None), s)), batches)
                step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step0 + s)
                # Steps past a client's K_i are computed and masked out: a lax.cond
                # around a convolution step was measured 14x slower on XLA:CPU.
                carry = block_step(x0, carry, batch, ex_mask, active[:, s], step_keys, eta, inv_b)
            return carry

        def broadcast(x0):
            self._count("broadcast")
            p = self.client_block
            return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (p,) + a.shape), x0)

        def accumulate(u, x0, params, weights):
            self._count("accumulate")
            return jax.tree_util.tree_map(
                lambda acc, a, b: acc + jnp.tensordot(weights, a[None] - b, axes=1), u, x0, params
            )

        def server_update(params, opt_state, u):
            self._count("server_update")
            updates, opt_state = self.server_optimizer.update(u, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def evaluate(params, batches):
            self._count("evaluate")

            def body(stat, batch):
                mask = batch[fedjax.EXAMPLE_MASK_KEY].astype(jnp.bool_)
                pred = model.apply_for_eval(params, batch)
                new = {k: fedjax.metrics.evaluate_batch(m, batch, pred, mask) for k, m in model.eval_metrics.items()}
                return jax.tree_util.tree_map(
                    lambda a, b: a.merge(b), stat, new, is_leaf=lambda v: isinstance(v, fedjax.metrics.Stat)
                ), None

            stat = {k: m.zero() for k, m in model.eval_metrics.items()}
            stat, _ = jax.lax.scan(body, stat, batches)
            return jax.tree_util.tree_map(
                lambda s: s.result(), stat, is_leaf=lambda v: isinstance(v, fedjax.metrics.Stat)
            )

        self.local_steps = jax.jit(local_steps, donate_argnums=(1, 2, 3))
        self.broadcast = jax.jit(broadcast)
        self.zeros = jax.jit(functools.partial(jax.tree_util.tree_map, jnp.zeros_like))
        self.accumulate = jax.jit(accumulate, donate_argnums=(0,))
        self.server_update = jax.jit(server_update)
        self.evaluate = jax.jit(evaluate)
        self.init = jax.jit(model.init)

    def _count(self, name: str) -> None:
        # Runs only while JAX traces a function, i.e. once per compiled program.
        self.compiles[name] = self.compiles.get(name, 0) + 1



LARGE_MODEL_EQNS = 200
"""Above this many operations in one example's forward pass (nested ones
counted), the automatic ``client_block`` on XLA:CPU is 1. The small
Shakespeare LSTM has 657, the digits and synthetic models 17 and 4."""


def _count_eqns(jaxpr) -> int:
    """Operations in ``jaxpr``, including those inside nested calls."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                total += _count_eqns(getattr(inner, "jaxpr", inner))
    return total


@functools.lru_cache(maxsize=64)
def _programs(model, server_optimizer, client_block: int, steps_per_call: int) -> _Programs:
    return _Programs(model, server_optimizer, client_block, steps_per_call)


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
    ):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a fathom_tune.Task, got {type(task).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
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
        self.eval_batch_size = check_positive_int("eval_batch_size", eval_batch_size)

        self._client_ids = tuple(task.train.client_ids())
        self._client_sizes = np.array([task.train.client_size(c) for c in self._client_ids])
        self._examples: dict[int, Mapping[str, np.ndarray]] = {}
        if client_block is None:
            one_at_a_time = jax.default_backend() == "cpu" and self._one_at_a_time_on_cpu()
            client_block = 1 if one_at_a_time else self.clients_per_round
        block = check_positive_int("client_block", client_block)
        self.client_block = min(block, self.clients_per_round)
        if steps_per_call is None:
            steps_per_call = 1 if self.client_block == 1 else 4
        self.steps_per_call = check_positive_int("steps_per_call", steps_per_call)
        self._eval_batches: dict[str, list] = {}
        self._programs = _programs(task.model, server_optimizer, self.client_block, self.steps_per_call)
        params = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
        self.param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))

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
        return "conv_general_dilated" in str(jaxpr) or _count_eqns(jaxpr.jaxpr) > LARGE_MODEL_EQNS

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
        phi = np.ones(len(sampled), np.float64)
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
            phi_b = np.ones(p_block, np.float32)
            loss_b = np.zeros(p_block, np.float32)
            cidx = np.zeros(p_block, np.int32)
            cidx[: len(members)] = sampled[members]
            active_all = np.zeros((p_block, n_calls * s_call), bool)
            for j, m in enumerate(members):
                active_all[j, : steps[m]] = True
            for call in range(n_calls):
                sl = slice(call * s_call, (call + 1) * s_call)
                batches = self._gather(members, sampled, plans, sl, p_block)
                params, phi_b, loss_b = self._programs.local_steps(
                    x0, params, phi_b, loss_b, batches, ex_mask, active_all[:, sl],
                    self.seed, rnd, cidx, call * s_call, eta, inv_b,
                )
            w = np.zeros(p_block, np.float32)
            w[: len(members)] = weights_all[members]
            u = self._programs.accumulate(u, x0, params, w)
            pending.append((members, phi_b, loss_b))
        new_params, opt_state = self._programs.server_update(x0, state.opt_state, u)
        for members, phi_b, loss_b in pending:
            phi[members] = np.asarray(phi_b)[: len(members)]
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
            phi=phi,
            client_loss=loss,
            train_loss=float(np.dot(weights_all, loss)),
            local_hypergradient=local_hypergradient(phi, sizes),
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
        n = int(self._client_sizes[client])
        need = k * b_int
        rng = _client_rng(self.seed, rnd, client)
        epochs = -(-need // n)
        flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:need]
        plan = np.zeros((total_steps, bucket), np.int64)
        plan[:k, :b_int] = flat.reshape(k, b_int)
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
