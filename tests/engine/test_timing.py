"""Compile time is the union of JAX's nested tracing/lowering/compile intervals, not their sum."""

import time

import jax
import jax.numpy as jnp

from fathom_tune.engine import timing as _timing


def test_nested_and_overlapping_intervals_count_once():
    union = _timing._Union()
    union.add(1.0, 2.0)  # a nested function's tracing...
    union.add(1.5, 2.5)  # ...another one overlapping it...
    union.add(0.5, 3.0)  # ...inside its caller's, reported last
    union.add(4.0, 4.25)  # a later, separate program
    assert union.total == 2.75  # 2.5 + 0.25, not 1 + 1 + 2.5 + 0.25 = 4.75
    union.add(4.25, 5.0)  # touching: merged
    assert union.total == 3.5


def test_compile_seconds_of_nested_jits_stay_within_the_wall_time():
    @jax.jit
    def leaf(x):
        for _ in range(20):
            x = jnp.sin(x) * 1.0001
        return x

    def nest(f):
        return jax.jit(lambda x: f(x) + f(x * 2.0))

    program = leaf
    for _ in range(6):  # six levels: each level's tracing holds all the levels below it
        program = nest(program)
    before = _timing.compile_seconds()
    start = time.perf_counter()
    program(jnp.ones(3)).block_until_ready()
    wall = time.perf_counter() - start
    spent = _timing.compile_seconds() - before
    assert 0.0 < spent <= wall
