"""Makes fedjax 0.0.17 (its last release) run on current JAX.

fedjax 0.0.17 still calls names that JAX has since removed:

* ``jax.tree_map`` and its relatives (``jax.tree_leaves``, ``jax.tree_flatten``,
  ...), moved to ``jax.tree_util`` (and ``jax.tree``);
* ``jnp.NINF`` / ``jnp.PINF`` / ``jnp.NaN`` (removed with NumPy 2), used to
  mask logits in fedjax's Shakespeare and Stack Overflow models and in its
  metrics.

:func:`apply` puts each missing name back as an alias of its current
equivalent. It only adds names that are absent and never replaces one that
JAX still provides, so it is harmless on any JAX version. ``fathom_tune``
calls it before it imports fedjax; code that imports fedjax directly should
``import fathom_tune`` first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_TREE_ALIASES = {
    "tree_map": "tree_map",
    "tree_multimap": "tree_map",
    "tree_leaves": "tree_leaves",
    "tree_flatten": "tree_flatten",
    "tree_unflatten": "tree_unflatten",
    "tree_structure": "tree_structure",
    "tree_transpose": "tree_transpose",
    "tree_reduce": "tree_reduce",
    "tree_all": "tree_all",
}

_NUMPY_CONSTANTS = {
    "NINF": -math.inf,
    "PINF": math.inf,
    "NaN": math.nan,
    "NAN": math.nan,
}


def missing_names() -> list[str]:
    """Names fedjax needs that the installed JAX lacks (before :func:`apply`)."""
    out = [f"jax.{name}" for name in _TREE_ALIASES if not _has(jax, name)]
    out += [f"jax.numpy.{name}" for name in _NUMPY_CONSTANTS if not _has(jnp, name)]
    return out


def apply() -> None:
    """Adds the removed JAX names that fedjax 0.0.17 uses. Idempotent."""
    for old, new in _TREE_ALIASES.items():
        if not _has(jax, old):
            setattr(jax, old, getattr(jax.tree_util, new))
    for name, value in _NUMPY_CONSTANTS.items():
        if not _has(jnp, name):
            setattr(jnp, name, value)


def _has(module, name: str) -> bool:
    # JAX raises AttributeError (sometimes with a deprecation message) for
    # removed names; a plain hasattr covers both.
    try:
        getattr(module, name)
    except AttributeError:
        return False
    return True
