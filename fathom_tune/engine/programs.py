"""The engine's compiled programs: module-level functions over a :class:`ProgramSpec`.

See :mod:`fathom_tune.engine.simulator` for the round they implement; here
are the programs both round paths call (a chunk of local steps on batches
gathered on the host, or a whole block of clients on resident data with the
server update; the update accumulation, the server update, the evaluation),
each ``jax.jit`` of a function here with its spec bound by
:func:`functools.partial`. :func:`programs` keeps one :class:`Programs` per
spec, so every engine of one configuration shares its compiled programs and
their count. Also: the optimizer digest of the engine's settings, and how
XLA:CPU should train a model (one client at a time or vmapped).
"""

from __future__ import annotations

import functools
import hashlib

import fedjax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_tune.engine import client_steps
from fathom_tune.engine.program_spec import CLIENTS as C
from fathom_tune.engine.program_spec import REPLICATED as R
from fathom_tune.engine.program_spec import ProgramSpec
from fathom_tune.engine.xla_options import compiler_options

__all__ = ["LARGE_MODEL_EQNS", "ProgramSpec", "Programs", "describe_optimizer", "programs"]


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



# ------------------------------------------------------------------ the host path
def local_steps(
    spec: ProgramSpec, x0, ctx, params, spare, stat, loss_sum, rate, batches, ex_mask, n_steps, seed, rnd, cidx,
    step0, eta, inv_b,
):
    """A chunk of ``steps_per_call`` local steps from step ``step0`` of a block's clients;
    client ``j`` runs those below its ``n_steps[j]``.

    The new models are written into ``spare`` (donated, never read), not over
    ``params``: with ``params`` donated, XLA copied them first on every call
    (4.7 MB for the EMNIST conv model's dense layer), as it cannot order the
    backward pass's reads of the weights before their in-place update. The
    caller passes the ``params`` it read as the next call's ``spare``."""
    spec.count("local_steps")
    body = spec.sharded(
        functools.partial(client_steps.chunk_of_steps, spec), (R, R, C, C, C, C, C, R, C, C, R, C, R), (C, C, C, C)
    )
    keys = client_steps.client_keys(seed, rnd, cidx)
    return body(x0, ctx, params, stat, loss_sum, rate, batches, ex_mask, n_steps, keys, step0, eta, inv_b)


def start_rates(spec: ProgramSpec, opt_state):
    spec.count("rate_start")
    return spec.sharded(functools.partial(client_steps.rate_start, spec), (R,), (R, C))(opt_state)


def report_rates(spec: ProgramSpec, rate):
    spec.count("rate_report")
    return spec.sharded(functools.partial(client_steps.rate_report, spec), (C,), C)(rate)


def validation_loss(spec: ProgramSpec, params, batches, mask):
    spec.count("validation_loss")
    return spec.sharded(functools.partial(client_steps.validation_losses, spec), (C, C, C), C)(params, batches, mask)


def broadcast(spec: ProgramSpec, x0):
    spec.count("broadcast")
    return spec.sharded(functools.partial(client_steps.spread, spec), (R,), C)(x0)


def accumulate(spec: ProgramSpec, u, x0, params, weights):
    spec.count("accumulate")
    add = spec.sharded(functools.partial(client_steps.weighted_update, spec), (R, C, C), R)(x0, params, weights)
    return jax.tree_util.tree_map(jnp.add, u, add)


def apply_server(spec: ProgramSpec, params, opt_state, u):
    updates, opt_state = spec.server_optimizer.update(u, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def server_update(spec: ProgramSpec, params, opt_state, u):
    spec.count("server_update")
    return apply_server(spec, params, opt_state, u)


# ------------------------------------------------------------------ the resident path
def block_round(spec: ProgramSpec, x0, opt_state, u, data, plan, ints, floats, seed, rnd, val):
    """A block of clients from the server model to the running sum of updates
    ``u`` plus its own, and the server update from that sum: one call, batches
    gathered on the device.

    Small inputs come packed, one transfer each: ``ints`` = (steps per client,
    client indices, B), ``floats`` = (learning rates, weights, 1 / B, the
    statistic's start); the per-client outputs come back as one array
    (statistic, summed loss, validation before, after, the local rate's report).
    """
    spec.count("local_steps")
    p = spec.client_block
    n_steps, cidx, b_int = ints[:p], ints[p : 2 * p], ints[2 * p]
    eta, weights, inv_b, stat0 = floats[:p], floats[p : 2 * p], floats[2 * p], floats[2 * p + 1]
    ex_mask = (jnp.arange(plan.shape[2]) < b_int).astype(jnp.float32)
    val_specs = None if val is None else (R, C, C)
    body = spec.sharded(
        functools.partial(client_steps.resident_block, spec), (R, R, R, C, C, R, C, C, R, C, R, val_specs), (R, C, C, C, C, C)
    )
    keys = client_steps.client_keys(seed, rnd, cidx)
    add, stat, loss_sum, before, after, report = body(
        x0, opt_state, data, plan, n_steps, ex_mask, keys, eta, inv_b, weights, stat0, val
    )
    u = jax.tree_util.tree_map(jnp.add, u, add)
    params, opt_state = apply_server(spec, x0, opt_state, u)
    return params, opt_state, u, jnp.stack([stat, loss_sum, before, after, report])


# ------------------------------------------------------------------ evaluation
def evaluate(spec: ProgramSpec, params, batches):
    """The model's ``eval_metrics`` over padded, masked ``batches`` (a scan over them)."""
    spec.count("evaluate")
    model = spec.model

    def body(stat, batch):
        mask = batch[fedjax.EXAMPLE_MASK_KEY].astype(jnp.bool_)
        pred = model.apply_for_eval(params, batch)
        new = {k: fedjax.metrics.evaluate_batch(m, batch, pred, mask) for k, m in model.eval_metrics.items()}
        return jax.tree_util.tree_map(
            lambda a, b: a.merge(b), stat, new, is_leaf=lambda v: isinstance(v, fedjax.metrics.Stat)
        ), None

    stat = {k: m.zero() for k, m in model.eval_metrics.items()}
    stat, _ = jax.lax.scan(body, stat, batches)
    return jax.tree_util.tree_map(lambda s: s.result(), stat, is_leaf=lambda v: isinstance(v, fedjax.metrics.Stat))


class Programs:
    """The jitted programs of one :class:`ProgramSpec`, shared by every engine with it (e.g.
    all trials of a baseline study on one task), so a new engine compiles nothing new.

    With more than one device, a block's clients are split over a one-axis mesh
    (``"clients"``) with :func:`jax.shard_map`: each device trains
    ``client_block / len(devices)`` of them with the same per-device code as a
    single device, and the weighted update is summed across devices
    (``psum``). Everything else (the server model, its optimizer state, the
    resident client data) is replicated.
    """

    def __init__(self, spec: ProgramSpec):
        self.spec = spec
        rep = spec.replicated
        jit = functools.partial(jax.jit, compiler_options=compiler_options(spec.devices))

        def bound(f):
            return functools.partial(f, spec)

        # keep_unused: ``spare`` is never read, but its buffers take the new models.
        self.local_steps = jit(bound(local_steps), donate_argnums=(3, 4, 5, 6), keep_unused=True)
        self.start_rates = jit(bound(start_rates))
        self.report_rates = jit(bound(report_rates))
        self.validation_loss = jit(bound(validation_loss))
        self.broadcast = jit(bound(broadcast))
        self.zeros = jit(functools.partial(jax.tree_util.tree_map, jnp.zeros_like), out_shardings=rep)
        self.accumulate = jit(bound(accumulate), donate_argnums=(0,))
        self.server_update = jit(bound(server_update), out_shardings=rep)
        self.block_round = jit(bound(block_round))
        self.evaluate = jit(bound(evaluate))
        self.init = jit(spec.model.init, out_shardings=rep)

    @property
    def compiles(self) -> dict[str, int]:
        """Programs compiled so far, by kind."""
        return self.spec.compiles

    def put(self, tree, per_client: bool = False):
        """``tree`` on this configuration's devices: replicated, or split on its first axis."""
        return jax.device_put(tree, self.spec.per_client if per_client else self.spec.replicated)


@functools.lru_cache(maxsize=64)
def programs(spec: ProgramSpec) -> Programs:
    """The :class:`Programs` of ``spec``: one per spec (equal specs share them)."""
    return Programs(spec)


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



def cpu_kind(model, example) -> str | None:
    """Whether XLA:CPU should train ``model`` one client at a time, and why: ``"conv"``,
    ``"long"`` or None (no: vmap the clients). ``example``: one client's examples.

    Yes for convolutions (a vmapped convolution with per-client kernels
    becomes a grouped convolution there, measured several times slower) and
    for models whose forward pass on one example is longer than
    :data:`LARGE_MODEL_EQNS` operations, such as FedJAX's statically unrolled
    LSTMs: vmapping them over clients multiplied compile time and slowed each
    round (small Shakespeare, BENCHMARKS.md: 102 s to compile one bucket with
    10 clients vmapped and 8 steps per call, 28 s one client at a time).
    """
    sample = {k: v[:1] for k, v in example.items()}
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(model.apply_for_train)(params, sample, jax.random.PRNGKey(0))
    if "conv_general_dilated" in str(jaxpr):
        return "conv"
    return "long" if count_eqns(jaxpr.jaxpr) > LARGE_MODEL_EQNS else None
