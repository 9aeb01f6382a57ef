"""The engine's compiled programs and the client-statistic hook they trace.

See :mod:`fathom_tune.engine` for the round they implement; here are the
jitted local steps (clients in vmapped blocks, steps in unrolled chunks,
steps past a client's ``K_i`` masked), the update accumulation, the server
update and the evaluation, shared by every engine of one configuration.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from typing import Any, Protocol

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

class ClientStatistic(Protocol):
    """A per-client scalar folded over the local steps, computed inside the compiled step.

    The engine starts each client at :attr:`initial` and, after every local
    step ``x_{k+1} = x_k - eta * g_k`` that the client runs, sets
    ``stat = update(stat, x0, g_k, x_{k+1})``; steps past the client's ``K_i``
    leave it unchanged. Implementations are hashable (frozen dataclasses):
    engines with equal statistics share compiled programs. FATHOM's ``phi``
    is one (:class:`fathom_tune.fathom.LocalAgreement`); static runs use none.
    """

    name: str
    initial: float

    def update(self, stat: jax.Array, x0: Any, grad: Any, params: Any) -> jax.Array:
        """The statistic after one more local step (traced under ``jax.jit``)."""


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
    """The jitted programs of one (model, server optimizer, block, chunk, statistic) configuration.

    Shared by every engine with that configuration (e.g. all trials of a
    baseline study on one task), so a new engine compiles nothing new.
    """

    def __init__(self, model, server_optimizer, client_block: int, steps_per_call: int, statistic):
        self.compiles: dict[str, int] = {}
        self.client_block = client_block
        self.server_optimizer = server_optimizer
        steps = steps_per_call

        def one_step(x0, params, stat, loss_sum, batch, ex_mask, on, step_key, eta, inv_b):
            def loss_fn(p):
                preds = model.apply_for_train(p, batch, step_key)
                return jnp.sum(model.train_loss(batch, preds) * ex_mask) * inv_b

            loss, g = jax.value_and_grad(loss_fn)(params)
            new = jax.tree_util.tree_map(lambda p, gi: p - eta * gi, params, g)
            if statistic is not None:  # static runs trace none of it
                stat = jnp.where(on, statistic.update(stat, x0, g, new).astype(stat.dtype), stat)
            params = jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new, params)
            return params, stat, loss_sum + jnp.where(on, loss, 0.0)

        def block_step(x0, carry, batch, ex_mask, on, keys, eta, inv_b):
            """One local step of every client of the block; ``on[j]``: client j still runs,
            with learning rate ``eta[j]``."""
            params, stat, loss_sum = carry
            if self.client_block == 1:
                # No vmap: a vmapped convolution with per-client kernels becomes a
                # grouped convolution, several times slower on XLA:CPU.
                first = functools.partial(jax.tree_util.tree_map, operator.itemgetter(0))
                out = one_step(
                    x0, first(params), stat[0], loss_sum[0], first(batch), ex_mask, on[0], keys[0], eta[0], inv_b
                )
                return jax.tree_util.tree_map(lambda a: a[None], out)
            return jax.vmap(one_step, in_axes=(None, 0, 0, 0, 0, None, 0, 0, 0, None))(
                x0, params, stat, loss_sum, batch, ex_mask, on, keys, eta, inv_b
            )

        def local_steps(x0, params, stat, loss_sum, batches, ex_mask, active, seed, rnd, cidx, step0, eta, inv_b):
            self._count("local_steps")
            base = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
            keys = jax.vmap(lambda c: jax.random.fold_in(base, c))(cidx)
            carry = (params, stat, loss_sum)
            for s in range(steps):  # unrolled: see the module docstring
                batch = jax.tree_util.tree_map(operator.itemgetter((slice(None), s)), batches)
                step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step0 + s)
                # Steps past a client's K_i are computed and masked out: a lax.cond
                # around a convolution step was measured 14x slower on XLA:CPU.
                carry = block_step(x0, carry, batch, ex_mask, active[:, s], step_keys, eta, inv_b)
            return carry

        def client_loss(params, batch, mask):
            """The summed loss of one client's model on its masked validation examples."""
            preds = model.apply_for_eval(params, batch)
            return jnp.sum(model.train_loss(batch, preds) * mask)

        def validation_loss(params, batches, mask):
            self._count("validation_loss")
            if self.client_block == 1:  # no vmap, as in block_step
                first = functools.partial(jax.tree_util.tree_map, operator.itemgetter(0))
                return client_loss(first(params), first(batches), mask[0])[None]
            return jax.vmap(client_loss)(params, batches, mask)

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
        self.validation_loss = jax.jit(validation_loss)
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
def programs(model, server_optimizer, client_block: int, steps_per_call: int, statistic) -> _Programs:
    return _Programs(model, server_optimizer, client_block, steps_per_call, statistic)
