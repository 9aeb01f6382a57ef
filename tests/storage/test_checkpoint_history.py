"""A run checkpoint's history file: what each save writes, what a load returns after
a kill at any point of a save, and who deletes it."""

import json
import math
import threading
from collections.abc import Sequence

import numpy as np
import optuna
import pytest
from _toy import toy_task

import baselines
from fathom_tune.engine import Cost, ServerState
from fathom_tune.loop import Progress
from fathom_tune.storage import checkpoint as ckpt
from fathom_tune.storage import history as history_files
from fathom_tune.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fathom_tune.tuners import Request
from fathom_tune.tuning.driver import one_run_storage

KIND = "history-test"
FINGERPRINT = {"task": "t", "seed": 1, "num_rounds": 1000}


@pytest.fixture(autouse=True)
def new_process(monkeypatch):
    """Each test starts with nothing known of any checkpoint, as a new process would."""
    monkeypatch.setattr(history_files, "_written", {})


def restart(monkeypatch) -> None:
    """Forgets what this process wrote or read, as after a kill and a restart."""
    monkeypatch.setattr(history_files, "_written", {})


def state(rounds: int) -> ServerState:
    return ServerState(
        params={"w": np.full(3, rounds, np.float32)}, opt_state=(np.zeros(2, np.float32),), round=rounds
    )


def row(i: int, tag: str = "run") -> dict:
    return {
        "round": i,
        "learning_rate": 0.1 * (i + 1),
        "train_loss": math.nan if i % 3 == 2 else 1.0 / (i + 1),
        "accepted": i % 3 != 2,
        "tag": tag,
    }


def progress(n: int, tag: str = "run", rows=None) -> Progress:
    rows = tuple(row(i, tag) for i in range(n)) if rows is None else rows
    return Progress(state(n), rows, Cost(rounds=n, examples=10 * n), {"accuracy": 0.5})


def save(path, n: int, **kwargs) -> None:
    ckpt.save_run(path, kind=KIND, fingerprint=FINGERPRINT, progress=progress(n, **kwargs))


def load(path) -> Progress:
    return ckpt.load_run(path, kind=KIND, fingerprint=FINGERPRINT, state=state(0))[0]


def history(path):
    return path.with_name(path.name + ".rows.jsonl")


def other_history(path):
    return path.with_name(path.name + ".rows.alt.jsonl")


def same(rows, want) -> bool:
    """Rows equal, NaN equal to NaN."""
    return json.dumps(list(rows), sort_keys=True) == json.dumps(list(want), sort_keys=True)


def parsed(file) -> list:
    """The rows in a history file, read here line by line."""
    return [json.loads(line) for line in file.read_bytes().splitlines()]


def test_a_save_appends_only_the_new_rows_and_a_load_returns_them_all(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save(path, 3)
    first = history(path).read_bytes()
    assert first.count(b"\n") == 3 and same(parsed(history(path)), [row(i) for i in range(3)])
    save(path, 8)
    after = history(path).read_bytes()
    assert after.startswith(first) and after[len(first) :].count(b"\n") == 5
    assert same(parsed(history(path)), [row(i) for i in range(8)])
    meta, _ = load_checkpoint(path, kind=KIND, templates={})
    assert "rows" not in meta
    assert meta["history"] == {"suffix": ".rows.jsonl", "rows": 8, "bytes": len(after)}
    assert same(load(path).rows, [row(i) for i in range(8)])
    restart(monkeypatch)
    loaded = load(path)
    assert same(loaded.rows, [row(i) for i in range(8)]) and math.isnan(loaded.rows[2]["train_loss"])
    assert loaded.state.round == 8 and loaded.cost == Cost(rounds=8, examples=80)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "c.npz.rows.jsonl"]


class _Killed(Exception):
    pass


def _kill_before_rename(path, monkeypatch, n: int) -> None:
    """A save of ``n`` rows killed after its rows reached the history file, before
    the ``.npz`` was written."""

    def killed(*args, **kwargs):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_checkpoint", killed)
        with pytest.raises(_Killed):
            save(path, n)


def _append(file, data: bytes) -> None:
    with open(file, "ab") as f:
        f.write(data)


TAILS = {
    "junk": lambda path, monkeypatch: _append(history(path), b"not json at all\n" * 100),
    "torn-line": lambda path, monkeypatch: _append(
        history(path), json.dumps(row(4, "x" * 2000)).encode()[:1500]
    ),
    "valid-rows": lambda path, monkeypatch: _append(
        history(path), b"".join(json.dumps(row(i)).encode() + b"\n" for i in (4, 5))
    ),
    "killed-save": lambda path, monkeypatch: _kill_before_rename(path, monkeypatch, 7),
}


@pytest.mark.parametrize("tail", sorted(TAILS))
def test_lines_past_the_recorded_bytes_are_ignored_and_cut_off_by_the_next_save(
    tmp_path, monkeypatch, tail
):
    path = tmp_path / "c.npz"
    save(path, 4)
    clean = history(path).read_bytes()
    TAILS[tail](path, monkeypatch)
    assert len(history(path).read_bytes()) > len(clean)
    restart(monkeypatch)
    resumed = load(path)
    assert same(resumed.rows, [row(i) for i in range(4)]) and resumed.state.round == 4
    save(path, 6)
    after = history(path).read_bytes()
    assert after.startswith(clean) and after[len(clean) :].count(b"\n") == 2
    assert same(parsed(history(path)), [row(i) for i in range(6)])
    restart(monkeypatch)
    assert same(load(path).rows, [row(i) for i in range(6)])


def test_a_fresh_run_starts_its_history_anew_over_a_stale_file(tmp_path):
    path = tmp_path / "c.npz"
    stale = b"".join(json.dumps(row(i, "stale")).encode() + b"\n" for i in range(10)) + b"{torn"
    history(path).write_bytes(stale)
    save(path, 2)
    assert same(parsed(history(path)), [row(i) for i in range(2)])
    assert same(load(path).rows, [row(i) for i in range(2)])


def test_a_fresh_run_over_another_runs_checkpoint_keeps_it_loadable_until_replaced(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save(path, 5, tag="old")
    restart(monkeypatch)
    _kill_before_rename(path, monkeypatch, 2)  # the fresh run's first save, killed
    assert same(load(path).rows, [row(i, "old") for i in range(5)])  # the old checkpoint is whole
    restart(monkeypatch)
    save(path, 2)
    assert same(load(path).rows, [row(i) for i in range(2)])
    assert same(parsed(other_history(path)), [row(i) for i in range(2)])
    assert not history(path).exists()  # the old run's history is gone with its checkpoint
    save(path, 3)  # and the new one continues in its file
    assert same(parsed(other_history(path)), [row(i) for i in range(3)])
    restart(monkeypatch)
    assert same(load(path).rows, [row(i) for i in range(3)])


def test_rows_that_do_not_extend_the_saved_ones_are_written_anew(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save(path, 6)
    save(path, 4)  # fewer rows than written
    assert same(load(path).rows, [row(i) for i in range(4)])
    changed = (*[row(i) for i in range(3)], {**row(3), "val_accuracy": 0.75})  # the last row replaced
    ckpt.save_run(path, kind=KIND, fingerprint=FINGERPRINT, progress=progress(4, rows=changed))
    restart(monkeypatch)
    assert same(load(path).rows, changed)
    assert sorted(p.name for p in tmp_path.iterdir()) in (
        ["c.npz", "c.npz.rows.jsonl"],
        ["c.npz", "c.npz.rows.alt.jsonl"],
    )


def test_a_checkpoint_replaced_behind_this_process_is_written_anew(tmp_path):
    path, elsewhere = tmp_path / "c.npz", tmp_path / "other" / "c.npz"
    elsewhere.parent.mkdir()
    save(path, 3)
    save(elsewhere, 5, tag="other")
    for source in (elsewhere, history(elsewhere)):  # e.g. a copy restored from elsewhere
        (tmp_path / source.name).write_bytes(source.read_bytes())
    save(path, 4)
    assert same(load(path).rows, [row(i) for i in range(4)])


def test_a_save_from_another_thread_is_continued_by_this_one(tmp_path):
    path = tmp_path / "c.npz"
    writer = threading.Thread(target=save, args=(path, 3))
    writer.start()
    writer.join()
    first = history(path).read_bytes()
    save(path, 5)
    assert history(path).read_bytes().startswith(first)
    assert same(parsed(history(path)), [row(i) for i in range(5)])


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda f: f.write_bytes(f.read_bytes()[:-5]),
            r"holds \d+ bytes, fewer than the \d+ the checkpoint records",
        ),
        (lambda f: f.unlink(), "cannot be read"),
        (lambda f: f.write_bytes(f.read_bytes()[:-1] + b"x"), "does not end a line"),
        (lambda f: f.write_bytes(b"x" + f.read_bytes()[1:]), "line 1 is not JSON"),
    ],
    ids=["truncated", "missing", "torn-at-the-end", "not-json"],
)
def test_a_damaged_history_file_is_refused_naming_it(tmp_path, monkeypatch, damage, match):
    path = tmp_path / "c.npz"
    save(path, 3)
    damage(history(path))
    restart(monkeypatch)
    named = rf"'.*c\.npz': its history file '.*c\.npz\.rows\.jsonl' {match}"
    with pytest.raises(CheckpointError, match=named):
        load(path)


def test_a_version_1_checkpoint_with_its_rows_in_the_metadata_loads(tmp_path, monkeypatch):
    path = tmp_path / "old.npz"
    rows = [row(i) for i in range(4)]
    meta = {  # what save_run wrote in format version 1
        "fingerprint": FINGERPRINT,
        "round": 4,
        "rng": {"seed": 1, "round": 4},
        "rows": ckpt.jsonable(rows),
        "cost": Cost(rounds=4, examples=40).as_dict(),
        "final_metrics": {"accuracy": 0.5},
    }
    with monkeypatch.context() as m:
        m.setattr(ckpt, "FORMAT_VERSION", 1)
        trees = {"params": state(4).params, "opt_state": state(4).opt_state}
        save_checkpoint(path, kind=KIND, meta=meta, trees=trees)
    with np.load(path) as stored:
        assert b'"version": 1' in stored["__meta__"].tobytes()
    loaded = load(path)
    assert same(loaded.rows, rows) and loaded.state.round == 4 and loaded.cost.examples == 40
    save(path, 6)  # the next save moves the rows into a history file
    assert "rows" not in load_checkpoint(path, kind=KIND, templates={})[0]
    assert same(parsed(history(path)), [row(i) for i in range(6)])
    restart(monkeypatch)
    assert same(load(path).rows, [row(i) for i in range(6)])


class _CountingRows(Sequence):
    """Rows that count how many of them a save reads."""

    def __init__(self, rows):
        self.rows, self.read = rows, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        item = self.rows[index]
        self.read += len(item) if isinstance(index, slice) else 1
        return item


def test_a_save_costs_the_new_rows_not_the_whole_history(tmp_path):
    path, rows = tmp_path / "c.npz", []
    npz_sizes, history_sizes, reads = [], [0], []
    for n in range(1, 301):
        rows.append(row(n - 1))
        counting = _CountingRows(list(rows))
        ckpt.save_run(path, kind=KIND, fingerprint=FINGERPRINT, progress=progress(n, rows=counting))
        reads.append(counting.read)
        npz_sizes.append(path.stat().st_size)
        history_sizes.append(history(path).stat().st_size)
    assert max(reads) <= 2  # the new row, and the last saved one to check it continues
    line = len(json.dumps(row(299), separators=(",", ":")))
    assert max(npz_sizes) - min(npz_sizes) < line  # the .npz does not grow with the history
    grown = np.diff(history_sizes)
    assert grown.min() > 0 and grown.max() < 2 * line  # the history file grows by one row a save
    assert same(parsed(history(path)), rows)


def test_remove_deletes_the_checkpoint_and_its_history_files(tmp_path):
    path = tmp_path / "c.npz"
    save(path, 3)
    other_history(path).write_bytes(b"left by a kill\n")
    ckpt.remove(path)
    assert list(tmp_path.iterdir()) == []
    ckpt.remove(path)  # nothing left to remove
    save(path, 2)  # a new run at the same path starts anew
    assert same(load(path).rows, [row(i) for i in range(2)])


def test_the_baselines_remove_beaten_checkpoints_with_their_history(tmp_path):
    objective = baselines.Objective(toy_task(num_rounds=2), checkpoint_dir=tmp_path)
    study = optuna.create_study(direction="maximize")
    dists = {"learning_rate": optuna.distributions.FloatDistribution(0.01, 20.0)}
    for value in (0.5, 0.7):
        trial = optuna.trial.create_trial(params={"learning_rate": 0.1}, distributions=dists, value=value)
        study.add_trial(trial)
    for number in range(2):
        save(tmp_path / f"trial{number}.npz", 2)
    objective.remove_beaten(study)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial1.npz", "trial1.npz.rows.jsonl"]


def test_a_one_run_checkpoint_whose_study_is_gone_is_removed_with_its_history(tmp_path):
    name = "toy/fathom/seed0"
    path = tmp_path / "toy-fathom-seed0.npz"
    save(path, 2)
    request = Request(
        task=toy_task(),
        budget_rounds=None,
        seed=0,
        storage=f"sqlite:///{tmp_path}/s.db",
        checkpoint_dir=tmp_path,
        progress=False,
    )
    _, got, finished = one_run_storage(request, name)
    assert got == path and finished is None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)]
