"""The engine's configuration: its settings as a comparable value, and the checks of its
arguments (statistic, server optimizer, local rate, validation share, bucket ladder,
devices; see :class:`fathom_tune.engine.Engine`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import optax

__all__ = ["EngineSettings"]


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything about an engine that changes its results besides task and seed.

    A frozen, comparable value: checkpoints store it and a resume with other
    settings is refused with the field that differs.

    Attributes:
        server_optimizer: the server optimizer as its behaviour: a digest of
            the updates it makes on a fixed probe (so ``optax.adam(1e-3)`` and
            ``optax.adam(1e-2)`` differ although both are ``adam``).
        buckets: the batch-size ladder.
        client_block: clients trained together.
        steps_per_call: local steps per compiled call.
        eval_batch_size: evaluation batch size.
        client_statistic: the client statistic's name, or None.
        client_validation: the share of each client's training examples held
            out for its own validation loss (0: none).
        devices: the local devices a round's clients are split over.
        local_rate: the :class:`LocalRate` rule's name, or None.
    """

    server_optimizer: str
    buckets: tuple[int, ...]
    client_block: int
    steps_per_call: int
    eval_batch_size: int
    client_statistic: str | None
    client_validation: float = 0.0
    devices: int = 1
    local_rate: str | None = None

    def as_dict(self) -> dict:
        """The fields by name; ``devices`` only when more than one and ``local_rate``
        only when set (how every earlier run was recorded, so their checkpoints
        still match)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["devices"] == 1:
            del out["devices"]
        if out["local_rate"] is None:
            del out["local_rate"]
        return out


def _checked_statistic(statistic):
    """``statistic`` if it is None or a :class:`ClientStatistic`, else a clear error."""
    if statistic is not None and not callable(getattr(statistic, "update", None)):
        raise TypeError(
            "client_statistic must be None or a ClientStatistic (with name, initial and "
            f"update), got {statistic!r}"
        )
    return statistic


def _checked_server_optimizer(optimizer, default: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` (``default`` for None) if it is an optax transformation, else a clear error."""
    if optimizer is None:
        return default
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"server_optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    return optimizer


def _checked_share(share) -> float:
    """``client_validation`` as a float in ``[0, 0.5]``, else a clear error."""
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating)):
        raise TypeError(f"client_validation must be a float in [0, 0.5], got {share!r}")
    if not 0.0 <= float(share) <= 0.5:
        raise ValueError(f"client_validation must be in [0, 0.5], got {share!r}")
    return float(share)


def _checked_buckets(buckets, widest: int) -> tuple[int, ...]:
    """``buckets`` as a tuple of ints if strictly ascending and holding ``widest``
    (the task's largest batch size), else a clear error."""
    buckets = tuple(buckets)
    if not buckets or any(
        isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in buckets
    ) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be strictly ascending ints >= 1, got {buckets!r}")
    if buckets[-1] < widest:
        raise ValueError(
            f"buckets: the largest bucket {buckets[-1]} is smaller than the batch size "
            f"{widest} that task.bounds allows; the largest bucket must be >= {widest}"
        )
    return tuple(int(b) for b in buckets)


def _checked_rate(rule, server_optimizer, task):
    """``rule`` if it is a usable :class:`LocalRate` for this server optimizer, else a clear error."""
    if rule is None:
        return None
    missing = [m for m in ("context", "init", "factor", "update", "report") if not callable(getattr(rule, m, None))]
    if missing or not isinstance(getattr(rule, "name", None), str):
        raise TypeError(
            f"local_rate must be None or a LocalRate (with name, context, init, factor, update and "
            f"report), got {rule!r}"
        )
    try:
        hash(rule)
    except TypeError:
        raise TypeError(f"local_rate must be hashable (a frozen dataclass), got {rule!r}") from None
    params = jax.eval_shape(task.model.init, jax.random.PRNGKey(0))
    try:
        jax.eval_shape(lambda o: rule.init(rule.context(o)), jax.eval_shape(server_optimizer.init, params))
    except Exception as err:
        raise ValueError(
            f"local_rate {rule.name!r} cannot read its context from this server optimizer's state "
            f"({type(err).__name__}: {err})"
        ) from err
    return rule


def _local_devices(devices) -> tuple:
    """The devices named by ``Engine(devices=...)``: None (all local ones), a count, or devices."""
    every = jax.local_devices()
    if devices is None:
        return tuple(every)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(every):
            raise ValueError(
                f"devices must be between 1 and the {len(every)} local device(s) of the "
                f"{jax.default_backend()} backend, got {devices}"
            )
        return tuple(every[: int(devices)])
    if isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device) for d in devices):
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices must not repeat a device, got {list(devices)!r}")
        return tuple(devices)
    raise TypeError(f"devices must be None, an int or a sequence of jax devices, got {devices!r}")
