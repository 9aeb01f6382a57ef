"""The engine's compiled programs.

See :mod:`fathom_tune.engine` for the round they implement; here are the
jitted local steps (clients in vmapped blocks, steps in unrolled chunks,
steps past a client's ``K_i`` masked), the update accumulation, the server
update and the evaluation, shared by every engine of one configuration.
"""

from __future__ import annotations

import functools
import hashlib
import operator

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from fathom_tune.engine.xla_options import compiler_options


def describe_optimizer(optimizer: optax.GradientTransformation, params) -> str:
    """A digest of what ``optimizer`` does: three updates of ``params`` on a fixed probe.

    Two optimizers get the same digest when they move the parameters alike on
    the probe (to 9 significant digits), e.g. ``optax.sgd(1.0)`` twice, and
    different ones when a rule or a hyperparameter differs.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.zeros((2, 3))}
    >>> describe_optimizer(optax.adam(1e-3), p) == describe_optimizer(optax.adam(1e-3), p)
    True
    >>> describe_optimizer(optax.adam(1e-3), p) == describe_optimizer(optax.adam(1e-2), p)
    False
    """
    shapes = jax.tree_util.tree_leaves(params)
    probe = [np.linspace(-1.0, 1.0, max(x.size, 1))[: x.size].reshape(x.shape) for x in shapes]
    treedef = jax.tree_util.tree_structure(params)
    x = jax.tree_util.tree_unflatten(treedef, [np.asarray(0.5 + 0.1 * p, np.float32) for p in probe])
    state = optimizer.init(x)
    for k in range(3):
        grad = jax.tree_util.tree_unflatten(
            treedef, [np.asarray((k + 1) * p + 0.01 * k, np.float32) for p in probe]
        )
        updates, state = optimizer.update(grad, state, x)
        x = optax.apply_updates(x, updates)
    values = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(x)])
    text = ",".join(f"{v:.9g}" for v in values).encode()
    return "probe-sha256:" + hashlib.sha256(text).hexdigest()[:16]


class _Programs:
    """The jitted programs of one (model, server optimizer, block, chunk, statistic, local rate,
    devices) configuration.

    Shared by every engine with that configuration (e.g. all trials of a
    baseline study on one task), so a new engine compiles nothing new.

    With more than one device, a block's clients are split over a one-axis
    mesh (``"clients"``) with :func:`jax.shard_map`: each device trains
    ``client_block / len(devices)`` of them with the same per-device code as a
    single device, and the weighted update is summed across devices
    (``psum``). Everything else (the server model, its optimizer state, the
    resident client data) is replicated.
    """

    def __init__(
        self, model, server_optimizer, client_block: int, steps_per_call: int, statistic, local_rate, devices
    ):
        self.compiles: dict[str, int] = {}
        self.client_block = client_block
        self.server_optimizer = server_optimizer
        self.devices = tuple(devices)
        n_dev = len(self.devices)
        if client_block % n_dev:
            raise ValueError(f"client_block {client_block} is not a multiple of the {n_dev} devices")
        local = client_block // n_dev  # clients per device
        steps = steps_per_call
        if n_dev > 1:
            self.mesh = jax.sharding.Mesh(np.array(self.devices), ("clients",))
            self.replicated = jax.sharding.NamedSharding(self.mesh, P())
            self.per_client = jax.sharding.NamedSharding(self.mesh, P("clients"))
        else:
            self.mesh = None
            self.replicated = self.per_client = jax.sharding.SingleDeviceSharding(self.devices[0])
        C, R = P("clients"), P()

        def sharded(f, in_specs, out_specs):
            """``f`` on each device's share of the clients (itself on one device)."""
            if self.mesh is None:
                return f
            return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

        def total(u):
            """The update summed over the devices' shares."""
            return u if self.mesh is None else jax.lax.psum(u, "clients")

        def kept(on, a, b):
            return jax.tree_util.tree_map(lambda x, y: jnp.where(on, x, y), a, b)

        def one_step(x0, ctx, params, stat, loss_sum, rate, batch, ex_mask, on, step_key, eta, inv_b):
            def loss_fn(p):
                preds = model.apply_for_train(p, batch, step_key)
                return jnp.sum(model.train_loss(batch, preds) * ex_mask) * inv_b

            loss, g = jax.value_and_grad(loss_fn)(params)
            lr = eta if local_rate is None else eta * local_rate.factor(rate).astype(eta.dtype)
            new = jax.tree_util.tree_map(lambda p, gi: p - lr * gi, params, g)
            if statistic is not None:  # static runs trace none of it
                stat = jnp.where(on, statistic.update(stat, x0, g, new).astype(stat.dtype), stat)
            if local_rate is not None:  # nor of this
                moved = jax.tree_util.tree_map(jnp.subtract, new, params)
                rate = kept(on, local_rate.update(rate, ctx, moved), rate)
            return kept(on, new, params), stat, loss_sum + jnp.where(on, loss, 0.0), rate

        first = functools.partial(jax.tree_util.tree_map, operator.itemgetter(0))

        def block_step(x0, ctx, carry, batch, ex_mask, on, keys, eta, inv_b):
            """One local step of a device's clients; ``on[j]``: client j still runs,
            with learning rate ``eta[j]`` (times its local rate's factor)."""
            params, stat, loss_sum, rate = carry
            if local == 1:
                # No vmap: a vmapped convolution with per-client kernels becomes a
                # grouped convolution, several times slower on XLA:CPU.
                out = one_step(
                    x0, ctx, first(params), stat[0], loss_sum[0], first(rate), first(batch), ex_mask, on[0],
                    keys[0], eta[0], inv_b,
                )
                return jax.tree_util.tree_map(lambda a: a[None], out)
            return jax.vmap(one_step, in_axes=(None, None, 0, 0, 0, 0, 0, None, 0, 0, 0, None))(
                x0, ctx, params, stat, loss_sum, rate, batch, ex_mask, on, keys, eta, inv_b
            )

        def rate_start(opt_state):
            """The local rate's context and every client's start state (empty without a rule)."""
            if local_rate is None:
                return (), ()
            ctx = local_rate.context(opt_state)
            return ctx, spread(local_rate.init(ctx))

        def rate_report(rate):
            if local_rate is None:
                return jnp.zeros((local,), jnp.float32)
            return jax.vmap(local_rate.report)(rate).astype(jnp.float32)

        def client_keys(seed, rnd, cidx):
            base = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
            return jax.vmap(lambda c: jax.random.fold_in(base, c))(cidx)

        def step_keys(keys, k):
            return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k)

        def spread(x0):
            return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (local,) + a.shape), x0)

        def weighted_update(x0, params, weights):
            return total(
                jax.tree_util.tree_map(lambda a, b: jnp.tensordot(weights, a[None] - b, axes=1), x0, params)
            )

        def client_loss(params, batch, mask):
            """The summed loss of one client's model on its masked validation examples."""
            preds = model.apply_for_eval(params, batch)
            return jnp.sum(model.train_loss(batch, preds) * mask)

        def validation_body(params, batches, mask):
            if local == 1:  # no vmap, as in block_step
                return client_loss(first(params), first(batches), mask[0])[None]
            return jax.vmap(client_loss)(params, batches, mask)

        # ---- the host-fed path: batches gathered on the host, a call per chunk of steps
        def local_steps_body(x0, ctx, params, stat, loss_sum, rate, batches, ex_mask, n_steps, keys, step0, eta, inv_b):
            carry = (params, stat, loss_sum, rate)
            for s in range(steps):  # unrolled: see the module docstring
                batch = jax.tree_util.tree_map(operator.itemgetter((slice(None), s)), batches)
                # Steps past a client's K_i are computed and masked out: a lax.cond
                # around a convolution step was measured 14x slower on XLA:CPU.
                carry = block_step(
                    x0, ctx, carry, batch, ex_mask, step0 + s < n_steps, step_keys(keys, step0 + s), eta, inv_b
                )
            return carry

        def local_steps(
            x0, ctx, params, spare, stat, loss_sum, rate, batches, ex_mask, n_steps, seed, rnd, cidx, step0, eta, inv_b
        ):
            """A chunk of ``steps`` local steps from step ``step0`` of a block's clients;
            client ``j`` runs those below its ``n_steps[j]``.

            The new models are written into ``spare`` (donated, never read), not over
            ``params``: with ``params`` donated, XLA copied them first on every call
            (4.7 MB for the EMNIST conv model's dense layer), as it cannot order the
            backward pass's reads of the weights before their in-place update. The
            caller passes the ``params`` it read as the next call's ``spare``."""
            self._count("local_steps")
            body = sharded(local_steps_body, (R, R, C, C, C, C, C, R, C, C, R, C, R), (C, C, C, C))
            keys = client_keys(seed, rnd, cidx)
            return body(x0, ctx, params, stat, loss_sum, rate, batches, ex_mask, n_steps, keys, step0, eta, inv_b)

        def start_rates(opt_state):
            self._count("rate_start")
            return sharded(rate_start, (R,), (R, C))(opt_state)

        def report_rates(rate):
            self._count("rate_report")
            return sharded(rate_report, (C,), C)(rate)

        def validation_loss(params, batches, mask):
            self._count("validation_loss")
            return sharded(validation_body, (C, C, C), C)(params, batches, mask)

        def broadcast(x0):
            self._count("broadcast")
            return sharded(spread, (R,), C)(x0)

        def accumulate(u, x0, params, weights):
            self._count("accumulate")
            add = sharded(weighted_update, (R, C, C), R)(x0, params, weights)
            return jax.tree_util.tree_map(jnp.add, u, add)

        def apply_server(params, opt_state, u):
            updates, opt_state = self.server_optimizer.update(u, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def server_update(params, opt_state, u):
            self._count("server_update")
            return apply_server(params, opt_state, u)

        # ---- the resident path: client data on the device, a block in one call
        def resident_body(x0, opt_state, data, plan, n_steps, ex_mask, keys, eta, inv_b, weights, stat0, val):
            ctx, rate = rate_start(opt_state)
            zeros = jnp.zeros((local,), jnp.float32)
            carry = (spread(x0), jnp.full((local,), stat0, jnp.float32), zeros, rate)

            def chunk(c, carry):
                for s in range(steps):  # unrolled chunks of steps inside a loop over chunks
                    k = c * steps + s
                    idx = jax.lax.dynamic_index_in_dim(plan, k, axis=1, keepdims=False)
                    batch = jax.tree_util.tree_map(lambda d: d[idx], data)
                    carry = block_step(
                        x0, ctx, carry, batch, ex_mask, k < n_steps, step_keys(keys, k), eta, inv_b
                    )
                return carry

            n_chunks = (jnp.max(n_steps) + steps - 1) // steps
            params, stat, loss_sum, rate = jax.lax.fori_loop(0, n_chunks, chunk, carry)
            if val is None:
                before = after = zeros
            else:
                val_data, val_idx, val_mask = val
                vbatch = jax.tree_util.tree_map(lambda d: d[val_idx], val_data)
                before = validation_body(spread(x0), vbatch, val_mask)
                after = validation_body(params, vbatch, val_mask)
            return weighted_update(x0, params, weights), stat, loss_sum, before, after, rate_report(rate)

        def block_round(x0, opt_state, u, data, plan, ints, floats, seed, rnd, val):
            """A block of clients from the server model to the running sum of updates
            ``u`` plus its own, and the server update from that sum: one call, batches
            gathered on the device.

            Small inputs come packed, one transfer each: ``ints`` = (steps per client,
            client indices, B), ``floats`` = (learning rates, weights, 1 / B, the
            statistic's start); the per-client outputs come back as one array
            (statistic, summed loss, validation before, after, the local rate's report).
            """
            self._count("local_steps")
            p = client_block
            n_steps, cidx, b_int = ints[:p], ints[p : 2 * p], ints[2 * p]
            eta, weights, inv_b, stat0 = floats[:p], floats[p : 2 * p], floats[2 * p], floats[2 * p + 1]
            ex_mask = (jnp.arange(plan.shape[2]) < b_int).astype(jnp.float32)
            val_specs = None if val is None else (R, C, C)
            body = sharded(resident_body, (R, R, R, C, C, R, C, C, R, C, R, val_specs), (R, C, C, C, C, C))
            keys = client_keys(seed, rnd, cidx)
            add, stat, loss_sum, before, after, report = body(
                x0, opt_state, data, plan, n_steps, ex_mask, keys, eta, inv_b, weights, stat0, val
            )
            u = jax.tree_util.tree_map(jnp.add, u, add)
            params, opt_state = apply_server(x0, opt_state, u)
            return params, opt_state, u, jnp.stack([stat, loss_sum, before, after, report])

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

        rep = self.replicated
        jit = functools.partial(jax.jit, compiler_options=compiler_options(self.devices))
        # keep_unused: ``spare`` is never read, but its buffers take the new models.
        self.local_steps = jit(local_steps, donate_argnums=(3, 4, 5, 6), keep_unused=True)
        self.start_rates = jit(start_rates)
        self.report_rates = jit(report_rates)
        self.validation_loss = jit(validation_loss)
        self.broadcast = jit(broadcast)
        self.zeros = jit(functools.partial(jax.tree_util.tree_map, jnp.zeros_like), out_shardings=rep)
        self.accumulate = jit(accumulate, donate_argnums=(0,))
        self.server_update = jit(server_update, out_shardings=rep)
        self.block_round = jit(block_round)
        self.evaluate = jit(evaluate)
        self.init = jit(model.init, out_shardings=rep)

    def _count(self, name: str) -> None:
        # Runs only while JAX traces a function, i.e. once per compiled program.
        self.compiles[name] = self.compiles.get(name, 0) + 1

    def put(self, tree, per_client: bool = False):
        """``tree`` on this configuration's devices: replicated, or split on its first axis."""
        return jax.device_put(tree, self.per_client if per_client else self.replicated)


LARGE_MODEL_EQNS = 200
"""Above this many operations in one example's forward pass (nested ones
counted), the automatic ``client_block`` on XLA:CPU is 1. The small
Shakespeare LSTM has 657, the digits and synthetic models 17 and 4."""


def count_eqns(jaxpr) -> int:
    """Operations in ``jaxpr``, including those inside nested calls."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                total += count_eqns(getattr(inner, "jaxpr", inner))
    return total


@functools.lru_cache(maxsize=64)
def programs(
    model, server_optimizer, client_block: int, steps_per_call: int, statistic, local_rate, devices
) -> _Programs:
    return _Programs(model, server_optimizer, client_block, steps_per_call, statistic, local_rate, devices)
