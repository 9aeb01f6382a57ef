"""fedjax 0.0.17 on current JAX: these fail if fathom_tune._compat.apply() is not in effect."""

import subprocess
import sys

import fedjax
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import fathom_tune
from fathom_tune import _compat


def test_fedjax_tree_utilities_run():
    # fedjax.tree_util.tree_zeros_like calls jax.tree_map, removed from JAX.
    tree = {"a": np.ones(3, np.float32), "b": (np.ones(2), 1.0)}
    zeros = fedjax.tree_util.tree_zeros_like(tree)
    assert float(sum(np.sum(x) for x in jax.tree_util.tree_leaves(zeros))) == 0.0
    assert jax.tree_map is jax.tree_util.tree_map or jax.tree_map(lambda x: x + 1, 1) == 2


def test_fedjax_models_using_ninf_build_and_mask():
    # fedjax's Shakespeare model masks logits with jnp.NINF, removed with NumPy 2.
    model = fedjax.models.shakespeare.create_lstm_model()
    mask = model.eval_metrics["accuracy_in_vocab"].logits_mask
    assert mask[0] == -np.inf and mask[1] == 0.0
    assert jnp.NINF == -np.inf


def test_fedjax_fed_avg_round_runs():
    data = {b"a": {"x": np.ones((4, 2), np.float32), "y": np.array([0, 1, 0, 1], np.int32)}}
    fd = fedjax.InMemoryFederatedData(data)
    model = fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(lambda b: hk.Linear(2)(b["x"])),
        sample_batch={"x": np.zeros((1, 2), np.float32)},
        train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
        eval_metrics={"accuracy": fedjax.metrics.Accuracy()},
    )
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        fedjax.model_grad(model),
        fedjax.optimizers.sgd(0.1),
        fedjax.optimizers.sgd(1.0),
        fedjax.ShuffleRepeatBatchHParams(batch_size=2),
    )
    state = algorithm.init(model.init(jax.random.PRNGKey(0)))
    new_state, _ = algorithm.apply(state, [(b"a", fd.get_client(b"a"), jax.random.PRNGKey(1))])
    assert not np.array_equal(
        np.asarray(new_state.params["linear"]["w"]), np.asarray(state.params["linear"]["w"])
    )


def test_apply_is_idempotent_and_leaves_nothing_missing():
    _compat.apply()
    _compat.apply()
    assert _compat.missing_names() == []
    assert fathom_tune.__version__


def test_shim_is_needed_on_this_jax():
    # In a fresh interpreter without the shim, report what this JAX lacks; if it
    # lacks nothing, the shim is a no-op and this test says so rather than failing.
    # Load _compat's file directly, so that the package __init__ does not apply it.
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('c', {_compat.__file__!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(','.join(m.missing_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    missing = [n for n in out.stdout.strip().split(",") if n]
    # JAX 0.4.26+ removed jax.tree_map; NumPy 2 / JAX 0.4.30+ removed jnp.NINF.
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 6):
        assert "jax.tree_map" in missing and "jax.numpy.NINF" in missing
