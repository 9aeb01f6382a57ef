"""The app's task: fathom_tune's offline digits task, one training client per SuperNode.

Both apps build the task from the run config, so the server (evaluation on
the validation and test writers) and every client (its own training part)
agree on the split. SuperNode ``partition-id = p`` is the task's training
client ``p`` (its position in ``task.train.client_ids()``).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
from flwr.app import Context

import fathom_tune  # before fedjax: it adapts fedjax to the installed JAX


@functools.lru_cache(maxsize=4)
def load_task(
    task_seed: int, validation: int, test: int, clients_per_writer: int
) -> fathom_tune.Task:
    """The digits task (scikit-learn's bundled copy, no download)."""
    return fathom_tune.tasks.digits(
        seed=task_seed,
        num_validation_writers=validation,
        num_test_writers=test,
        clients_per_writer=clients_per_writer,
    )


def task_from_config(context: Context) -> fathom_tune.Task:
    """The task the run config describes (the same object for every call in a process)."""
    cfg = context.run_config
    return load_task(
        int(cfg["task-seed"]),
        int(cfg["validation-writers"]),
        int(cfg["test-writers"]),
        int(cfg["clients-per-writer"]),
    )


def model_template(task: fathom_tune.Task):
    """The model's structure, shapes and dtypes (nothing is computed)."""
    return jax.eval_shape(task.model.init, jax.random.PRNGKey(0))


def client_index(task: fathom_tune.Task, context: Context) -> int:
    """The training client this SuperNode holds: its ``partition-id``."""
    value = context.node_config.get("partition-id")
    count = task.train.num_clients()
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise ValueError(
            f"node config partition-id={value!r}: must be an int in 0..{count - 1} (the task has "
            f"{count} training clients); start the SuperNode with "
            "--node-config 'partition-id=<p> num-partitions=<n>'"
        )
    return value


@functools.lru_cache(maxsize=64)
def client_examples(task: fathom_tune.Task, index: int) -> dict[str, np.ndarray]:
    """Training client ``index``'s examples, ``{"x": [n, 8, 8, 1], "y": [n]}``."""
    cid = list(task.train.client_ids())[index]
    return {k: np.asarray(v) for k, v in task.train.get_client(cid).all_examples().items()}


def optional_path(context: Context, key: str) -> pathlib.Path | None:
    """The run-config entry ``key`` as an absolute path, ``None`` when empty.

    The ServerApp runs in Flower's own working directory, not where
    ``flwr run`` was typed, so a relative path would land somewhere
    unexpected: it is refused.
    """
    value = str(context.run_config[key])
    if not value:
        return None
    path = pathlib.Path(value).expanduser()
    if not path.is_absolute():
        raise ValueError(f"run config {key}={value!r} must be an absolute path (or empty)")
    return path


def storage_from_config(context: Context):
    """The run config's ``storage``: an RDB URL, an absolute journal path, or ``None``."""
    value = str(context.run_config["storage"])
    if not value:
        return None
    if "://" in value:
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            raise ValueError(
                f"run config storage={value!r}: use an absolute SQLite path, "
                "sqlite:////absolute/path.db (four slashes)"
            )
        return value
    return str(optional_path(context, "storage"))
