"""The engine's client data: every client's training examples, its held-out validation
part, and the pooled evaluation batches of the task's splits.

A client is named by its position in ``task.train.client_ids()``. With
``client_validation > 0`` each client holds out ``ceil(share * n_i)`` of its
examples (a fixed permutation per seed and client; at least one example
stays for training): FedEx's per-client validation (Khodak et al., arXiv
2106.04502). Examples are read from the task on first use and kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import fedjax
import jax.numpy as jnp
import numpy as np

from fathom_tune.task import Task

__all__ = ["ClientData"]


class ClientData:
    """Every client's training examples and validation part, read once.

    Attributes:
        ids: the client ids, in ``train.client_ids()`` order.
        sizes: each client's training examples (its validation part left out).
        held: each client's validation examples (0 without ``validation``).
    """

    def __init__(self, task: Task, seed: int, validation: float):
        train = task.train
        self._task, self._train, self._seed, self._share = task, train, seed, validation
        self.ids = tuple(train.client_ids())
        full = np.array([train.client_size(c) for c in self.ids])
        self.held = np.array([self._held_out(int(n)) for n in full], dtype=np.int64)
        self.sizes = full - self.held
        self._examples: dict[int, Mapping[str, np.ndarray]] = {}
        self._validation: dict[int, Mapping[str, np.ndarray]] = {}
        self._pooled: dict[tuple[str, int], dict] = {}

    def _held_out(self, n: int) -> int:
        """Validation examples held out of a client with ``n`` training examples."""
        if self._share == 0.0 or n < 2:
            return 0
        return min(math.ceil(self._share * n), n - 1)

    def split(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of client ``index``'s examples that it trains on, and its validation part:
        the first ``held[index]`` of a permutation drawn from ``(seed, index)``."""
        n = int(self.sizes[index] + self.held[index])
        held = int(self.held[index])
        if held == 0:
            return np.arange(n), np.arange(0)
        perm = np.random.default_rng(np.random.SeedSequence([self._seed, index, 0xC1])).permutation(n)
        return np.sort(perm[held:]), np.sort(perm[:held])

    def examples(self, index: int) -> Mapping[str, np.ndarray]:
        """Client ``index``'s training examples, feature by feature."""
        ex = self._examples.get(index)
        if ex is None:
            ds = self._train.get_client(self.ids[index])
            ex = {k: np.asarray(v) for k, v in ds.all_examples().items()}
            if self._share > 0.0:
                train, val = self.split(index)
                self._validation[index] = {k: v[val] for k, v in ex.items()}
                ex = {k: v[train] for k, v in ex.items()}
            self._examples[index] = ex
        return ex

    def validation(self, index: int) -> Mapping[str, np.ndarray]:
        """Client ``index``'s validation part, feature by feature."""
        self.examples(index)
        return self._validation[index]

    @functools.cached_property
    def example_bytes(self) -> int:
        """The bytes of one training example, all its features (from the arrays' shapes,
        so a client without examples counts too)."""
        return sum(v.dtype.itemsize * math.prod(v.shape[1:]) for v in self.examples(0).values())

    def pooled(self, split: str, batch_size: int) -> dict:
        """Every example of the task's ``split`` in padded batches of ``min(batch_size,
        n)``, :data:`fedjax.EXAMPLE_MASK_KEY` marking the real ones (made once)."""
        key = (split, batch_size)
        if key not in self._pooled:
            self._pooled[key] = _pooled_batches(getattr(self._task, split), batch_size)
        return self._pooled[key]


def _pooled_batches(fd: fedjax.FederatedData, batch_size: int) -> dict:
    parts = [ds.all_examples() for _, ds in fd.clients()]
    pooled = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    n = len(next(iter(pooled.values())))
    size = min(batch_size, n)
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
