"""XLA options of the engine's compiled programs.

One place decides how :mod:`fathom_tune.engine.programs` (and the Flower client's
jitted step) compile: :func:`compiler_options` for the devices a program runs
on, passed to ``jax.jit(..., compiler_options=...)`` so that nothing else in
the process changes.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["compiler_options", "cpu_compiler_options"]

# YNNPACK fusion kinds XLA:CPU uses by default, less its convolutions (see
# :func:`cpu_compiler_options`).
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def cpu_compiler_options() -> tuple[tuple[str, str], ...]:
    """XLA:CPU options of the engine's programs: convolutions without YNNPACK.

    XLA:CPU (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK
    by default. On the 2-core x86 machine of ``BENCHMARKS.md`` a YNNPACK
    convolution step of FedJAX's EMNIST conv model took 1.8-4x as long as
    XLA's own (B = 8 ... 64), so the engine compiles its programs with
    YNNPACK's dots and reductions only. Models without convolutions compile
    to the same program either way.

    Empty (XLA's defaults) where this jaxlib does not know the option, or
    where ``XLA_FLAGS`` already sets it: the user's choice wins.
    """
    if _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return ()
    options = ((_YNN_OPTION, _YNN_WITHOUT_CONVOLUTIONS),)
    try:
        probe = jax.jit(lambda x: x + 1.0, compiler_options=dict(options))
        probe.lower(jax.ShapeDtypeStruct((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError:  # a jaxlib without this option or these values
        return ()
    return options


def compiler_options(devices) -> dict[str, str] | None:
    """The options the engine compiles with on ``devices`` (None: XLA's defaults)."""
    if not all(d.platform == "cpu" for d in devices):
        return None
    return dict(cpu_compiler_options()) or None
