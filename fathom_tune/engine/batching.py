"""How a FedAvg round is batched: the batch-size ladders, the client sampling rule, the
clients' shuffles and the one builder of their batch plans (see :mod:`fathom_tune.engine`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def fine_buckets(max_size: int = 1 << 16) -> tuple[int, ...]:
    """A close batch-size ladder for compute-bound steps: every size to 16, every
    even size to 64, then sixteen per doubling (``68, 72, ..., 128, 136, ...``),
    up to the first that holds ``max_size``.

    Padding costs less than a sixteenth of a step, and none at any size to 16,
    any even size to 64 or any power of two; a batch size drifting from 4 to
    256 meets 69 buckets.

    >>> fine_buckets(80)[14:24]
    (15, 16, 18, 20, 22, 24, 26, 28, 30, 32)
    >>> fine_buckets(80)[35:]
    (56, 58, 60, 62, 64, 68, 72, 76, 80)
    """
    out = list(range(1, 17)) + list(range(18, 65, 2))
    step = 4
    while out[-1] < max_size:
        out.extend(range(out[-1] + step, 2 * out[-1] + 1, step))
        step *= 2
    n = next(i for i, b in enumerate(out) if b >= max_size)
    return tuple(out[: n + 1])  # up to the first size that holds max_size


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
    rng = generator(seed, round_index, 0x5A)
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def client_rng(seed: int, round_index: int, client_index: int) -> np.random.Generator:
    """The generator that orders client ``client_index``'s data in round ``round_index``
    (``client_index``: the client's position in ``task.train.client_ids()``).

    >>> client_rng(0, 3, 1).permutation(4).tolist() == client_rng(0, 3, 1).permutation(4).tolist()
    True
    """
    return generator(seed, round_index, client_index, 0xB5)


def generator(*words: int) -> np.random.Generator:
    """``np.random.default_rng(np.random.SeedSequence([*words]))``: the same generator,
    made from a uint32 array of the words where each fits 32 bits (the seed
    sequence then takes a third of the time; a round makes one generator per
    sampled client).

    >>> a, b = generator(7, 3, 0xB5), np.random.default_rng(np.random.SeedSequence([7, 3, 0xB5]))
    >>> bool(a.integers(1 << 62) == b.integers(1 << 62))
    True
    """
    if all(0 <= w < 1 << 32 for w in words):
        return np.random.default_rng(np.random.SeedSequence(np.array(words, np.uint32)))
    return np.random.default_rng(np.random.SeedSequence(list(words)))


class Shuffles:
    """One client's passes over its ``n`` examples in a round, drawn from ``rng`` as
    needed: consecutive passes, a fresh permutation per pass, so no example repeats
    before every example has been used. The one shuffling rule of the engine's two
    round paths and of the Flower client (:func:`batch_plan`); passes are drawn on
    the first :meth:`take` that needs them, so a round's can be drawn ahead of time.

    >>> sh = Shuffles(np.random.default_rng(0), 4)
    >>> a = sh.take(6)
    >>> sorted(a[:4].tolist()), bool((sh.take(6) == a).all())
    ([0, 1, 2, 3], True)
    """

    def __init__(self, rng: np.random.Generator, n: int):
        self._rng, self._n, self._passes = rng, n, []

    def take(self, need: int) -> np.ndarray:
        """The first ``need`` indices of the consecutive passes."""
        if self._n == 0 and need > 0:
            raise ValueError(f"a client without examples has no batch of {need} indices")
        while len(self._passes) * self._n < need:
            self._passes.append(self._rng.permutation(self._n))
        if len(self._passes) == 1:
            return self._passes[0][:need]
        return np.concatenate(self._passes)[:need]


def batch_plan(
    order: Shuffles, steps: int, batch: int, *, into: np.ndarray | None = None, offset: int = 0
) -> np.ndarray:
    """One client's batches as example indices: the first ``steps * batch`` indices of
    ``order`` cut into ``steps`` rows of exactly ``batch`` examples.

    The one plan builder: both round paths and the Flower client's
    :func:`~fathom_tune.flower.client.batch_plan` make every client's plan here.

    Args:
        order: the client's :class:`Shuffles` for the round.
        steps, batch: ``K_i`` and ``B_int``.
        into: a zeroed plan ``[rows, bucket]`` (``rows >= steps``, ``bucket >=
            batch``) to write into and return; ``None``: a new ``[steps, batch]``.
        offset: added to every slot of the first ``steps`` rows (where the
            client's examples start among every client's): a padding slot then
            points at the client's first example. Rows past ``steps`` stay 0.

    >>> plan = batch_plan(Shuffles(np.random.default_rng(0), 5), 2, 3, into=np.zeros((3, 4), np.int64), offset=10)
    >>> bool((plan[:2, 3] == 10).all()), plan[2].tolist(), sorted(plan[:2, :3].ravel()[:5] - 10) == list(range(5))
    (True, [0, 0, 0, 0], True)
    """
    drawn = order.take(steps * batch).reshape(steps, batch)
    if into is None:
        return drawn + offset if offset else drawn
    rows = into[:steps]
    rows[:, :batch] = drawn
    if offset:
        rows += offset
    return into


def batch_indices(num_examples: int, steps: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Example indices ``[steps, batch]`` of one client's round: shuffle, repeat
    (:func:`batch_plan` of ``Shuffles(rng, num_examples)``).

    >>> plan = batch_indices(10, 3, 4, np.random.default_rng(0))
    >>> plan.shape, sorted(plan.ravel()[:10].tolist()) == list(range(10))
    ((3, 4), True)
    """
    return batch_plan(Shuffles(rng, num_examples), steps, batch)
