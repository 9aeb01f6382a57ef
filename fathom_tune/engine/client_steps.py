"""The clients' local training as traced functions of a :class:`ProgramSpec`.

What :mod:`fathom_tune.engine.programs` compiles, on one device's share of a
block's clients: a local SGD step (the loss averaged over exactly ``B_int``
real examples of a padded batch, the client statistic and the local rate
folded in), a step of every client of the share (``jax.vmap``, none for one
client per device), a chunk of ``steps_per_call`` unrolled steps with the
steps past a client's ``K_i`` masked, the validation loss and the weighted
update. Every function takes the spec first; the programs bind it with
:func:`functools.partial`.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from fathom_tune.engine.program_spec import ProgramSpec

__all__: list[str] = []

first = functools.partial(jax.tree_util.tree_map, operator.itemgetter(0))
"""The first client's part of every leaf."""


def kept(on, a, b):
    """``a`` where ``on``, else ``b``, leaf by leaf."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(on, x, y), a, b)


def spread(spec: ProgramSpec, x0):
    """``x0`` once per client of a device's share."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (spec.per_device,) + a.shape), x0)


def one_step(spec: ProgramSpec, x0, ctx, params, stat, loss_sum, rate, batch, ex_mask, on, step_key, eta, inv_b):
    """One client's local step ``x <- x - eta * g`` (``on``: the client still runs)."""
    model, statistic, local_rate = spec.model, spec.statistic, spec.local_rate

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


def block_step(spec: ProgramSpec, x0, ctx, carry, batch, ex_mask, on, keys, eta, inv_b):
    """One local step of a device's clients; ``on[j]``: client j still runs, with
    learning rate ``eta[j]`` (times its local rate's factor)."""
    params, stat, loss_sum, rate = carry
    step = functools.partial(one_step, spec)
    if spec.per_device == 1:
        # No vmap: a vmapped convolution with per-client kernels becomes a
        # grouped convolution, several times slower on XLA:CPU.
        out = step(
            x0, ctx, first(params), stat[0], loss_sum[0], first(rate), first(batch), ex_mask, on[0],
            keys[0], eta[0], inv_b,
        )
        return jax.tree_util.tree_map(lambda a: a[None], out)
    return jax.vmap(step, in_axes=(None, None, 0, 0, 0, 0, 0, None, 0, 0, 0, None))(
        x0, ctx, params, stat, loss_sum, rate, batch, ex_mask, on, keys, eta, inv_b
    )


def chunk_of_steps(spec: ProgramSpec, x0, ctx, params, stat, loss_sum, rate, batches, ex_mask, n_steps, keys, step0, eta, inv_b):
    """``steps_per_call`` unrolled local steps from step ``step0``, batches given."""
    carry = (params, stat, loss_sum, rate)
    for s in range(spec.steps_per_call):  # unrolled: see fathom_tune.engine.simulator
        batch = jax.tree_util.tree_map(operator.itemgetter((slice(None), s)), batches)
        # Steps past a client's K_i are computed and masked out: a lax.cond
        # around a convolution step was measured 14x slower on XLA:CPU.
        carry = block_step(
            spec, x0, ctx, carry, batch, ex_mask, step0 + s < n_steps, step_keys(keys, step0 + s), eta, inv_b
        )
    return carry


def rate_start(spec: ProgramSpec, opt_state):
    """The local rate's context and every client's start state (empty without a rule)."""
    if spec.local_rate is None:
        return (), ()
    ctx = spec.local_rate.context(opt_state)
    return ctx, spread(spec, spec.local_rate.init(ctx))


def rate_report(spec: ProgramSpec, rate):
    """Every client's local-rate report (zeros without a rule)."""
    if spec.local_rate is None:
        return jnp.zeros((spec.per_device,), jnp.float32)
    return jax.vmap(spec.local_rate.report)(rate).astype(jnp.float32)


def client_keys(seed, rnd, cidx):
    """The model's random key of every client's round: ``(seed, round, client)`` folded."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
    return jax.vmap(lambda c: jax.random.fold_in(base, c))(cidx)


def step_keys(keys, k):
    """Every client's key of local step ``k``."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, k)


def weighted_update(spec: ProgramSpec, x0, params, weights):
    """``sum_j w_j (x0 - x_j)`` over the block's clients (all devices' shares)."""
    return spec.total(
        jax.tree_util.tree_map(lambda a, b: jnp.tensordot(weights, a[None] - b, axes=1), x0, params)
    )


def client_loss(spec: ProgramSpec, params, batch, mask):
    """The summed loss of one client's model on its masked validation examples."""
    preds = spec.model.apply_for_eval(params, batch)
    return jnp.sum(spec.model.train_loss(batch, preds) * mask)


def validation_losses(spec: ProgramSpec, params, batches, mask):
    """Every client's summed validation loss (no vmap for one client, as in :func:`block_step`)."""
    if spec.per_device == 1:
        return client_loss(spec, first(params), first(batches), mask[0])[None]
    return jax.vmap(functools.partial(client_loss, spec))(params, batches, mask)


def resident_block(spec: ProgramSpec, x0, opt_state, data, plan, n_steps, ex_mask, keys, eta, inv_b, weights, stat0, val):
    """A device's clients from the server model to their weighted update, batches gathered
    from the resident ``data`` at ``plan``; a loop over only the chunks the longest
    client needs, each chunk unrolled."""
    steps = spec.steps_per_call
    ctx, rate = rate_start(spec, opt_state)
    zeros = jnp.zeros((spec.per_device,), jnp.float32)
    carry = (spread(spec, x0), jnp.full((spec.per_device,), stat0, jnp.float32), zeros, rate)

    def chunk(c, carry):
        for s in range(steps):  # unrolled chunks of steps inside a loop over chunks
            k = c * steps + s
            idx = jax.lax.dynamic_index_in_dim(plan, k, axis=1, keepdims=False)
            batch = jax.tree_util.tree_map(lambda d: d[idx], data)
            carry = block_step(spec, x0, ctx, carry, batch, ex_mask, k < n_steps, step_keys(keys, k), eta, inv_b)
        return carry

    n_chunks = (jnp.max(n_steps) + steps - 1) // steps
    params, stat, loss_sum, rate = jax.lax.fori_loop(0, n_chunks, chunk, carry)
    if val is None:
        before = after = zeros
    else:
        val_data, val_idx, val_mask = val
        vbatch = jax.tree_util.tree_map(lambda d: d[val_idx], val_data)
        before = validation_losses(spec, spread(spec, x0), vbatch, val_mask)
        after = validation_losses(spec, params, vbatch, val_mask)
    return weighted_update(spec, x0, params, weights), stat, loss_sum, before, after, rate_report(spec, rate)
