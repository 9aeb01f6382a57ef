"""The catalogue of bad inputs: one table over the public Python API and the CLIs.

Every row is one bad input. A Python call must raise the given exception
with a message naming the argument or field (a regex); a command line
(``python -m studies...``) must exit with status 2 and print an error naming
the option, before any training. Either way nothing may be written: every
row runs in its own temporary directory (holding the fixture files below),
which must be unchanged afterwards, names, sizes and modification times
alike, so no storage, journal, SQLite file, report or directory appears, and
no cache file is touched. Rows with a password check that it is masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable

import fedjax
import numpy as np
import pytest
from _toy import mlp_model, toy_task

import baselines
import fathom_tune
from fathom_tune import Bounds, CheckpointError, Engine, FathomConfig, HParams, Target, tasks
from fathom_tune.storage.checkpoint import FORMAT_VERSION, save_checkpoint
from fathom_tune.tasks import fedjax_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


@functools.cache
def toy() -> fathom_tune.Task:
    """6 training clients, 4 per round, 10 rounds, bounds [1e-4, 10] x [0.01, 10] x [1, 256]."""
    return toy_task()


def arrays(**changes) -> dict:
    """Arguments of ``tasks.from_arrays`` for a valid two-client task, with ``changes``."""
    rng = np.random.default_rng(0)

    def client(n):
        return rng.normal(size=(n, 16)), rng.integers(0, 5, n)

    kwargs = {
        "name": "mine",
        "train": {"a": client(5), "b": client(7)},
        "validation": {"c": client(4)},
        "test": {"d": client(4)},
        "model": mlp_model(),
        "clients_per_round": 2,
        "target": Target("accuracy", 0.5),
        "init_hparams": HParams(0.1, 1.0, 4.0),
        "bounds": Bounds(HParams(1e-3, 0.1, 1.0), HParams(1.0, 10.0, 64.0)),
    }
    kwargs.update(changes)
    return kwargs


def write_fedjax_sqlite(path: pathlib.Path, clients: dict) -> None:
    with fedjax.SQLiteFederatedDataBuilder(os.fspath(path)) as builder:
        builder.add_many(clients.items())


def write_table(path: pathlib.Path, create: str, row: tuple) -> None:
    """An SQLite file holding one table (``create``) with one ``row``."""
    table = create.split()[2]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(create)
        db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a row's call may use: its directory and pytest's ``monkeypatch``.

    Fixture files under ``tmp``: ``a_file`` (a file), ``a_dir/`` (an empty
    directory), bad checkpoints (:func:`checkpoint_files`), and FedJAX cache directories: ``empty_cache/``;
    ``garbage_cache/`` (EMNIST files of random bytes); ``wrong_table_cache/``
    (Shakespeare files that are SQLite databases without FedJAX's table);
    ``bad_blob_cache/`` (EMNIST files in FedJAX's schema whose client data is
    not zlib-compressed msgpack); ``bad_vocab_cache/`` (valid Stack Overflow
    SQLite files and a ``stackoverflow.word_count`` that is not text).
    """

    tmp: pathlib.Path
    monkeypatch: pytest.MonkeyPatch


def prepare(tmp: pathlib.Path) -> None:
    (tmp / "a_file").write_text("x")
    for d in ("a_dir", "empty_cache"):
        (tmp / d).mkdir()
    garbage = tmp / "garbage_cache"
    garbage.mkdir()
    for split in ("train", "test"):
        (garbage / f"federated_emnist_{split}.sqlite").write_bytes(b"\x13not a database" * 64)
    wrong = tmp / "wrong_table_cache"
    wrong.mkdir()
    for split in ("train", "test"):
        write_table(wrong / f"shakespeare_{split}.sqlite", "CREATE TABLE other (x)", (1,))
    blob = tmp / "bad_blob_cache"
    blob.mkdir()
    schema = "CREATE TABLE federated_data (client_id BLOB, data BLOB, num_examples INTEGER)"
    for split in ("train", "test"):
        write_table(blob / f"federated_emnist_{split}.sqlite", schema, (b"c0", b"\x00junk", 3))
    vocab = tmp / "bad_vocab_cache"
    vocab.mkdir()
    for split in ("train", "test"):
        write_fedjax_sqlite(
            vocab / f"stackoverflow_{split}.sqlite", {b"u0": {"x": np.zeros(3, np.int32)}}
        )
    (vocab / "stackoverflow.word_count").write_bytes(b"\xff\xfe\x00\x81 binary")
    for name, data in checkpoint_files().items():
        (tmp / name).write_bytes(data)


@functools.cache
def checkpoint_files() -> dict[str, bytes]:
    """Bad checkpoint files for the toy task, by name (built once, written per row)."""
    import io
    import tempfile

    state = Engine(toy()).init()
    trees = {"params": state.params, "opt_state": state.opt_state, "momentum": state.params}
    toy_meta = {"fingerprint": {"task": "toy", "seed": 5}, "round": 1, "rows": [], "cost": {}}
    out = {"garbage.npz": b"PK\x03\x04 not really a zip" * 8}
    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(3))
    out["no_meta.npz"] = buffer.getvalue()
    buffer = io.BytesIO()
    meta = np.frombuffer(b'{"version": 1, "kind": "fathom", "meta": {}}', dtype=np.uint8)
    np.savez(buffer, __meta__=meta, evil=np.array([{"a": 1}], dtype=object))
    out["pickled.npz"] = buffer.getvalue()
    with tempfile.TemporaryDirectory() as d:
        for name, kind, meta, tree in [
            ("other_kind.npz", "baseline-trial", toy_meta, trees),
            ("other_model.npz", "fathom", toy_meta, {**trees, "params": [np.zeros(3)]}),
            ("other_run.npz", "fathom", toy_meta, trees),
        ]:
            save_checkpoint(pathlib.Path(d) / name, kind=kind, meta=meta, trees=tree)
            out[name] = (pathlib.Path(d) / name).read_bytes()
        future = pathlib.Path(d) / "future.npz"
        save_checkpoint(future, kind="fathom", meta=toy_meta, trees=trees)
        with np.load(future) as z:
            arrays = {k: z[k] for k in z.files}
        written = f'"version": {FORMAT_VERSION}'.encode()
        document = bytes(arrays["__meta__"]).replace(written, b'"version": 99')
        arrays["__meta__"] = np.frombuffer(document, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        out["future.npz"] = buffer.getvalue()
    out["truncated.npz"] = out["other_run.npz"][: len(out["other_run.npz"]) // 2]
    return out


def resume_toy(ctx: Ctx, name: str, **kwargs):
    """``optimize`` on the toy task resuming from the fixture checkpoint ``name``."""
    kwargs = {"storage": f"sqlite:///{ctx.tmp}/s.db", "progress": False, **kwargs}
    return fathom_tune.optimize(toy(), checkpoint=ctx.tmp / name, **kwargs)


def snapshot(root: pathlib.Path) -> list[tuple]:
    """Every path under ``root`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(root)), p.is_dir() or p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    )


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad input: a Python ``call`` raising ``error``, or a command line ``cli``.

    ``cli`` is ``(module, *argv)``; ``{tmp}`` in it is the row's directory.
    ``match`` is searched in the exception message (Python) or stderr (CLI);
    ``secret`` must appear in neither.
    """

    match: str
    call: Callable[[Ctx], object] | None = None
    error: type[Exception] | None = None
    cli: tuple[str, ...] = ()
    secret: str | None = None


def py(id_: str, error: type[Exception], match: str, call, secret=None):
    return pytest.param(Bad(match, call=call, error=error, secret=secret), id=id_)


def cli(id_: str, match: str, *argv: str, secret=None):
    return pytest.param(Bad(match, cli=argv, secret=secret), id=id_)


def run_bad_baseline(name: str = "random", **kwargs):
    """``baselines.run`` on the toy task, 3 trials' budget unless ``kwargs`` say otherwise."""
    return baselines.run(toy(), name, **{"budget_rounds": 30, "progress": False, **kwargs})


def with_data_dir(ctx: Ctx, directory: str, builder):
    ctx.monkeypatch.setenv(fedjax_cache.ENV_VAR, os.fspath(ctx.tmp / directory))
    return builder()


PASSWORD_URL = "nosuchdb://bob:secret@db.example/optuna"
OUTSIDE_TOY = Bounds(HParams(1e-4, 0.01, 1.0), HParams(100.0, 10.0, 256.0))

CASES = [
    # ------------------------------------------------------------------ tasks
    py("tasks.get-unknown-name", ValueError, r"unknown task 'nope'; valid names: \['digits'",
       lambda c: tasks.get("nope")),
    py("tasks.get-name-not-str", TypeError, r"task name must be a str, got \['digits'\]",
       lambda c: tasks.get(["digits"])),
    py("tasks.get-unknown-kwarg", TypeError, r"unexpected keyword argument 'num_writers'",
       lambda c: tasks.get("digits", num_writers=3)),
    py("digits-clients_per_writer-11", ValueError, r"clients_per_writer must be in 1..10, got 11",
       lambda c: tasks.digits(clients_per_writer=11)),
    py("synthetic-num_clients-0", ValueError, r"num_clients must be >= 1, got 0",
       lambda c: tasks.synthetic(num_clients=0)),
    py("synthetic-beta-nan", ValueError, r"beta must be a finite number >= 0, got nan",
       lambda c: tasks.synthetic(beta=NAN)),
    py("shakespeare-seed-negative", ValueError, r"seed must be an int >= 0, got -1",
       lambda c: tasks.shakespeare(seed=-1)),
    py("emnist-num_validation_clients-0", ValueError, r"num_validation_clients must be >= 1",
       lambda c: tasks.emnist(cache_dir=c.tmp / "empty_cache", num_validation_clients=0)),
    py("stackoverflow-vocab_size-0", ValueError, r"vocab_size must be >= 1, got 0",
       lambda c: tasks.stackoverflow(cache_dir=c.tmp / "empty_cache", vocab_size=0)),
    py("Task.replace-clients_per_round-above-clients", ValueError,
       r"Task.clients_per_round=7 exceeds the 6 training clients; allowed: 1..6",
       lambda c: toy().replace(clients_per_round=7)),
    py("Task.replace-num_rounds-0", ValueError, r"Task.num_rounds must be >= 1, got 0",
       lambda c: toy().replace(num_rounds=0)),
    py("Task.replace-eval_every-float", TypeError, r"Task.eval_every must be an int, got 1.5",
       lambda c: toy().replace(eval_every=1.5)),
    py("Task.replace-name-with-slash", ValueError, r"Task.name must be a non-empty str without '/'",
       lambda c: toy().replace(name="a/b")),
    py("Task.replace-init-outside-bounds", ValueError,
       r"Task.init_hparams.learning_rate=100.0 is outside the bounds \[0.0001, 10.0\]",
       lambda c: toy().replace(init_hparams=HParams(100.0, 1.0, 10.0))),
    py("Task.replace-target-metric-unknown", ValueError,
       r"Task.target.metric='f1' is not one of the model's eval_metrics",
       lambda c: toy().replace(target=Target("f1", 0.9))),
    py("Task.replace-unknown-field", TypeError, r"unexpected keyword argument 'rounds'",
       lambda c: toy().replace(rounds=5)),
    py("from_arrays-x-y-lengths-differ", ValueError, r"train\[b'a'\]: x has 5 rows but y has 4",
       lambda c: tasks.from_arrays(**arrays(train={"a": (np.ones((5, 16)), np.zeros(4, int))}))),
    py("from_arrays-clients_per_round-above-clients", ValueError,
       r"Task.clients_per_round=3 exceeds the 2 training clients",
       lambda c: tasks.from_arrays(**arrays(clients_per_round=3))),
    py("from_arrays-client-without-examples", ValueError, r"test\[b'd'\] has 0 examples",
       lambda c: tasks.from_arrays(**arrays(test={"d": (np.ones((0, 16)), np.zeros(0, int))}))),
    py("emnist-cache-file-missing", FileNotFoundError,
       r"federated_emnist_train.sqlite is not in the data directory '.*empty_cache'",
       lambda c: tasks.emnist(cache_dir=c.tmp / "empty_cache")),
    py("FATHOM_TUNE_DATA_DIR-cache-file-missing", FileNotFoundError,
       r"shakespeare_train.sqlite is not in the data directory '.*empty_cache'.*"
       r"\$FATHOM_TUNE_DATA_DIR",
       lambda c: with_data_dir(c, "empty_cache", tasks.shakespeare_fedjax)),
    py("emnist-cache-file-not-sqlite", ValueError,
       r"federated_emnist_train.sqlite in the data directory '.*garbage_cache' is not a FedJAX "
       r"federated SQLite file \(DatabaseError: file is not a database\)",
       lambda c: tasks.emnist(cache_dir=c.tmp / "garbage_cache")),
    py("FATHOM_TUNE_DATA_DIR-cache-file-without-fedjax-table", ValueError,
       r"shakespeare_train.sqlite in the data directory '.*wrong_table_cache' is not a FedJAX "
       r"federated SQLite file \(no table federated_data",
       lambda c: with_data_dir(c, "wrong_table_cache", tasks.shakespeare_fedjax)),
    py("emnist-cache-file-client-data-corrupted", ValueError,
       r"federated_emnist_train.sqlite .* is not a FedJAX federated SQLite file \(error: "
       r".*download it again from https://",
       lambda c: tasks.emnist(cache_dir=c.tmp / "bad_blob_cache")),
    py("stackoverflow-word_count-not-text", ValueError,
       r"bad_vocab_cache/stackoverflow.word_count' is not a stackoverflow.word_count file",
       lambda c: tasks.stackoverflow(cache_dir=c.tmp / "bad_vocab_cache")),
    # ---------------------------------------------------- engine hyperparameters
    py("HParams-learning_rate-0", ValueError, r"learning_rate must be a finite number > 0, got 0.0",
       lambda c: HParams(0.0, 1.0, 10.0)),
    py("HParams-local_epochs-nan", ValueError, r"local_epochs must be a finite number > 0, got nan",
       lambda c: HParams(0.1, NAN, 10.0)),
    py("HParams-batch_size-inf", ValueError, r"batch_size must be a finite number > 0, got inf",
       lambda c: HParams(0.1, 1.0, INF)),
    py("HParams-batch_size-negative", ValueError, r"batch_size must be a finite number > 0",
       lambda c: HParams(0.1, 1.0, -4.0)),
    py("HParams-learning_rate-str", TypeError, r"learning_rate must be a real number, got '0.1'",
       lambda c: HParams("0.1", 1.0, 10.0)),
    py("Engine-task-str", TypeError, r"task must be a fathom_tune.Task, got str",
       lambda c: Engine("digits")),
    py("Engine-buckets-descending", ValueError, r"buckets must be strictly ascending",
       lambda c: Engine(toy(), buckets=(4, 2))),
    py("Engine-buckets-below-batch-size-bound", ValueError,
       r"buckets: the largest bucket 4 is smaller than the batch size 256 that task.bounds allows",
       lambda c: Engine(toy(), buckets=(1, 2, 4))),
    py("Engine-client_block-0", ValueError, r"client_block must be >= 1, got 0",
       lambda c: Engine(toy(), client_block=0)),
    py("Engine-steps_per_call-float", TypeError, r"steps_per_call must be an int, got 1.5",
       lambda c: Engine(toy(), steps_per_call=1.5)),
    py("Engine-seed-negative", ValueError, r"seed must be an int >= 0, got -1",
       lambda c: Engine(toy(), seed=-1)),
    py("Engine-eval_batch_size-0", ValueError, r"eval_batch_size must be >= 1, got 0",
       lambda c: Engine(toy(), eval_batch_size=0)),
    py("Engine-server_optimizer-str", TypeError, r"server_optimizer must be an optax",
       lambda c: Engine(toy(), server_optimizer="adam")),
    # ------------------------------------------------------------ FATHOM config
    py("FathomConfig-gamma_learning_rate-negative", ValueError,
       r"FathomConfig.gamma_learning_rate must be a finite number >= 0, got -0.01",
       lambda c: FathomConfig(gamma_learning_rate=-0.01)),
    py("FathomConfig-gamma_batch_size-nan", ValueError, r"FathomConfig.gamma_batch_size .* nan",
       lambda c: FathomConfig(gamma_batch_size=NAN)),
    py("FathomConfig-alpha-1", ValueError, r"FathomConfig.alpha must be in \[0, 1\), got 1.0",
       lambda c: FathomConfig(alpha=1.0)),
    py("FathomConfig-alpha-negative", ValueError, r"FathomConfig.alpha .* >= 0, got -0.5",
       lambda c: FathomConfig(alpha=-0.5)),
    py("FathomConfig-init-outside-bounds", ValueError,
       r"FathomConfig.init.batch_size=512.0 is outside the bounds \[1.0, 256.0\]",
       lambda c: FathomConfig(init=HParams(0.1, 1.0, 512.0), bounds=toy().bounds)),
    py("FathomConfig-init-dict", TypeError, r"FathomConfig.init must be an HParams or None",
       lambda c: FathomConfig(init={"learning_rate": 0.1})),
    py("Bounds-lower-above-upper", ValueError,
       r"Bounds: lower local_epochs=5.0 is greater than upper local_epochs=1.0",
       lambda c: Bounds(HParams(1e-3, 5.0, 1.0), HParams(1.0, 1.0, 64.0))),
    py("Bounds-lower-non-positive", ValueError, r"learning_rate must be a finite number > 0",
       lambda c: Bounds(HParams(0.0, 0.1, 1.0), HParams(1.0, 1.0, 64.0))),
    py("Bounds-lower-tuple", TypeError, r"Bounds.lower must be an HParams",
       lambda c: Bounds((1e-3, 0.1, 1.0), HParams(1.0, 1.0, 64.0))),
    # ---------------------------------------------------------------- optimize
    py("optimize-task-str", TypeError, r"task must be a fathom_tune.Task",
       lambda c: fathom_tune.optimize("digits")),
    py("optimize-num_rounds-0", ValueError, r"num_rounds must be >= 1, got 0",
       lambda c: fathom_tune.optimize(toy(), num_rounds=0, storage=c.tmp / "j.log")),
    py("optimize-eval_every-0", ValueError, r"eval_every must be >= 1, got 0",
       lambda c: fathom_tune.optimize(toy(), eval_every=0, storage=c.tmp / "j.log")),
    py("optimize-eval_every-float", TypeError, r"eval_every must be an int, got 2.5",
       lambda c: fathom_tune.optimize(toy(), eval_every=2.5)),
    py("optimize-study_name-empty", ValueError, r"study_name must be a non-empty str or None",
       lambda c: fathom_tune.optimize(toy(), study_name="", storage=c.tmp / "j.log")),
    py("optimize-study_name-int", ValueError, r"study_name must be a non-empty str or None, got 7",
       lambda c: fathom_tune.optimize(toy(), study_name=7)),
    py("optimize-seed-negative", ValueError, r"seed must be an int >= 0, got -1",
       lambda c: fathom_tune.optimize(toy(), seed=-1, storage=c.tmp / "j.log")),
    py("optimize-config-dict", TypeError, r"config must be a FathomConfig or None, got dict",
       lambda c: fathom_tune.optimize(toy(), config={"alpha": 0.5})),
    py("optimize-config.init-outside-task-bounds", ValueError,
       r"config.init.learning_rate=100.0 is outside the bounds",
       lambda c: fathom_tune.optimize(toy(), config=FathomConfig(init=HParams(100.0, 1.0, 8.0)))),
    py("optimize-engine-kwarg-buckets-before-storage", ValueError, r"buckets: the largest bucket",
       lambda c: fathom_tune.optimize(toy(), buckets=(1, 2, 4), storage=c.tmp / "j.log")),
    # ----------------------------------------------------------- baselines.run
    py("baselines.run-unknown-name", ValueError, r"unknown baseline 'bogus'; valid names: \[",
       lambda c: run_bad_baseline(name="bogus")),
    py("baselines.run-budget_rounds-below-one-trial", ValueError,
       r"budget_rounds=9 is smaller than one trial: task 'toy' runs num_rounds=10",
       lambda c: run_bad_baseline(budget_rounds=9)),
    py("baselines.run-budget_rounds-0", ValueError, r"budget_rounds must be >= 1, got 0",
       lambda c: run_bad_baseline(budget_rounds=0)),
    py("baselines.run-budget_examples-below-cheapest-trial", ValueError,
       r"budget_examples=1 is smaller than the cheapest trial",
       lambda c: run_bad_baseline(budget_examples=1, storage=c.tmp / "j.log")),
    py("baselines.run-seed-negative", ValueError, r"seed must be an int >= 0, got -1",
       lambda c: run_bad_baseline(seed=-1)),
    py("baselines.run-worker-negative", ValueError, r"worker must be an int >= 0, got -2",
       lambda c: run_bad_baseline(worker=-2)),
    py("baselines.run-worker-bool", TypeError, r"worker must be an int, got True",
       lambda c: run_bad_baseline(worker=True)),
    py("baselines.run-space-outside-task-bounds", ValueError,
       r"space.upper=HParams\(learning_rate=100.0.* lies outside the bounds of task 'toy'",
       lambda c: run_bad_baseline(space=OUTSIDE_TOY, storage=c.tmp / "j.log")),
    py("baselines.run-space-str", TypeError, r"space must be a fathom_tune.Bounds or None",
       lambda c: run_bad_baseline(space="wide")),
    py("baselines.Grid-points-0", ValueError, r"Grid.points must be a tuple of three ints >= 1",
       lambda c: baselines.Grid(points=(0, 1, 1))),
    py("baselines.TPE-n_startup_trials-negative", ValueError,
       r"TPE.n_startup_trials must be >= 0, got -1", lambda c: baselines.TPE(n_startup_trials=-1)),
    py("baselines.Hyperband-reduction_factor-1", ValueError,
       r"Hyperband.reduction_factor must be >= 2, got 1",
       lambda c: baselines.Hyperband(reduction_factor=1)),
    py("baselines.Baseline-name-with-slash", ValueError, r"Baseline.name must be a non-empty str",
       lambda c: baselines.Baseline("a/b", baselines.Random())),
    # ---------------------------------------------------------------- storage
    py("open_storage-unknown-scheme-password-masked", ValueError,
       r"storage='nosuchdb://bob:\*\*\*@db.example/optuna' cannot be opened",
       lambda c: fathom_tune.open_storage(PASSWORD_URL), secret="secret"),
    py("open_storage-directory", ValueError, r"storage='.*a_dir' is a directory",
       lambda c: fathom_tune.open_storage(os.fspath(c.tmp / "a_dir"))),
    py("open_storage-journal-parent-missing", ValueError,
       r"storage='.*missing/j.log': directory '.*missing' does not exist",
       lambda c: fathom_tune.open_storage(c.tmp / "missing" / "j.log")),
    py("open_storage-sqlite-parent-missing", ValueError,
       r"storage='sqlite:///.*missing/x.db' cannot be opened as an Optuna RDB storage",
       lambda c: fathom_tune.open_storage(f"sqlite:///{c.tmp}/missing/x.db")),
    py("open_storage-sqlite-directory", ValueError, r"storage='sqlite:///.*a_dir' cannot be opened",
       lambda c: fathom_tune.open_storage(f"sqlite:///{c.tmp}/a_dir")),
    py("open_storage-float", TypeError, r"storage must be None, an optuna BaseStorage, an RDB URL",
       lambda c: fathom_tune.open_storage(3.5)),
    py("optimize-storage-sqlite-parent-missing", ValueError, r"storage='sqlite:///.*missing/x.db'",
       lambda c: fathom_tune.optimize(toy(), storage=f"sqlite:///{c.tmp}/missing/x.db")),
    py("baselines.run-storage-directory", ValueError, r"storage='.*a_dir' is a directory",
       lambda c: run_bad_baseline(storage=os.fspath(c.tmp / "a_dir"))),
    # ------------------------------------------------------------ checkpoints
    py("checkpoint-garbage", CheckpointError, r"checkpoint '.*garbage.npz' is damaged or not a checkpoint",
       lambda c: resume_toy(c, "garbage.npz")),
    py("checkpoint-truncated", CheckpointError, r"checkpoint '.*truncated.npz' is damaged",
       lambda c: resume_toy(c, "truncated.npz")),
    py("checkpoint-without-metadata", CheckpointError, r"'.*no_meta.npz' has no metadata",
       lambda c: resume_toy(c, "no_meta.npz")),
    py("checkpoint-pickled-object-array", CheckpointError,
       r"'.*pickled.npz' is damaged or not a checkpoint: .*allow_pickle=False",
       lambda c: resume_toy(c, "pickled.npz")),
    py("checkpoint-future-format-version", CheckpointError,
       r"'.*future.npz' has format version 99; this fathom_tune reads versions 1, 2$",
       lambda c: resume_toy(c, "future.npz")),
    py("checkpoint-of-a-baseline-trial", CheckpointError,
       r"'.*other_kind.npz' was written by a 'baseline-trial' run, not 'fathom'",
       lambda c: resume_toy(c, "other_kind.npz")),
    py("checkpoint-of-another-model", CheckpointError,
       r"'.*other_model.npz' field 'params' holds 1 arrays; this run's params has \d+",
       lambda c: resume_toy(c, "other_model.npz")),
    py("checkpoint-of-another-run", CheckpointError,
       r"'.*other_run.npz' belongs to another run: it differs in .*\bseed: checkpoint 5, this run 0",
       lambda c: resume_toy(c, "other_run.npz")),
    py("checkpoint-is-a-directory", ValueError, r"checkpoint='.*a_dir' is a directory",
       lambda c: resume_toy(c, "a_dir")),
    py("checkpoint-parent-missing", ValueError,
       r"checkpoint='.*missing/c.npz': directory '.*missing' does not exist",
       lambda c: resume_toy(c, "missing/c.npz")),
    py("checkpoint-without-persistent-storage", ValueError, r"checkpoint needs a persistent storage",
       lambda c: resume_toy(c, "new.npz", storage=None)),
    py("checkpoint_every-0", ValueError, r"checkpoint_every must be >= 1, got 0",
       lambda c: resume_toy(c, "new.npz", checkpoint_every=0)),
    py("baselines.run-checkpoint_dir-missing", ValueError,
       r"checkpoint_dir='.*missing' is not an existing directory",
       lambda c: run_bad_baseline(checkpoint_dir=c.tmp / "missing")),
    py("baselines.run-heartbeat-grace-below-interval", ValueError,
       r"heartbeat must be None or \(interval, grace_period\) ints .* got \(5, 2\)",
       lambda c: run_bad_baseline(storage=f"sqlite:///{c.tmp}/s.db", heartbeat=(5, 2))),
    # ------------------------------------------------------------------- CLIs
    cli("compare-unknown-tuner", r"--tuners: unknown tuner\(s\) 'bogus'; valid tuners: fathom",
        "studies.compare", "--tuners", "fathom", "bogus", "--out", "{tmp}/out"),
    cli("compare-out-is-a-file", r"--out: output path '.*a_file' is a file, not a directory",
        "studies.compare", "--out", "{tmp}/a_file"),
    cli("compare-storage-unknown-scheme", r"--storage 'nosuchdb://bob:\*\*\*@db.example/optuna' "
        r"is not an Optuna RDB URL", "studies.compare", "--storage", PASSWORD_URL,
        "--out", "{tmp}/out", secret="secret"),
    cli("compare-unknown-start", r"--starts: unknown start\(s\) 'eta\*3'; valid starts: default, eta/10, "
        r"eta\*10, B=4, B=256", "studies.compare", "--starts", "default", "eta*3", "--out", "{tmp}/out"),
    cli("peers-unknown-start", r"--starts: unknown start\(s\) 'lr/2'; valid starts: default, eta/10",
        "studies.peers", "--tasks", "digits", "--starts", "lr/2", "--out", "{tmp}/out"),
    cli("peers-unknown-tuner", r"--tuners: unknown tuner\(s\) 'bogus'; valid tuners: fathom",
        "studies.peers", "--tuners", "fathom", "bogus", "--out", "{tmp}/out"),
    cli("fathom-unknown-task", r"argument --task: invalid choice: 'nope'",
        "studies.fathom", "--task", "nope", "--storage", "sqlite:///{tmp}/f.db"),
    cli("fathom-seed-negative", r"--seed must be >= 0, got -3",
        "studies.fathom", "--seed", "-3", "--storage", "sqlite:///{tmp}/f.db"),
    cli("fathom-storage-under-a-file", r"--storage 'sqlite:///.*a_file/f.db': '.*a_file' is a "
        r"file, not a directory", "studies.fathom", "--storage", "sqlite:///{tmp}/a_file/f.db"),
    cli("fathom-checkpoint-is-a-directory", r"--checkpoint '.*a_dir': give a file path",
        "studies.fathom", "--checkpoint", "{tmp}/a_dir", "--storage", "sqlite:///{tmp}/f.db"),
    cli("fathom-checkpoint-damaged", r"--checkpoint: checkpoint '.*garbage.npz' is damaged",
        "studies.fathom", "--checkpoint", "{tmp}/garbage.npz", "--storage", "sqlite:///{tmp}/f.db"),
    cli("paper_claims-seeds-negative", r"--seeds must be distinct ints >= 0, got \[0, -1\]",
        "studies.paper_claims", "--tasks", "digits", "--seeds", "0", "-1", "--out", "{tmp}/out"),
    cli("paper_claims-out-under-a-file", r"--out '.*a_file/sub': '.*a_file' is a file",
        "studies.paper_claims", "--tasks", "digits", "--out", "{tmp}/a_file/sub"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_rejected_by_name_and_nothing_is_written(case, tmp_path, monkeypatch):
    prepare(tmp_path)
    before = snapshot(tmp_path)
    if case.cli:
        module, *argv = (a.format(tmp=tmp_path) for a in case.cli)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run(
            [sys.executable, "-m", module, *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        message = proc.stderr
        assert proc.returncode == 2, message
        assert re.search(case.match, message), message
        assert "Traceback" not in message
        shown = message + proc.stdout
    else:
        with pytest.raises(case.error, match=case.match) as info:
            case.call(Ctx(tmp_path, monkeypatch))
        shown = str(info.value)
    if case.secret is not None:
        assert case.secret not in shown
    assert snapshot(tmp_path) == before
