"""The Optuna internals fathom_tune relies on, checked against the installed Optuna.

Every function of :mod:`fathom_tune.storage.optuna_internals` runs here on
every storage kind and is compared with the public call it stands in for. An
Optuna release that moves, renames or reshapes an internal fails these tests
with a message naming the internal and the Optuna version (the module's own
:class:`OptunaInternalsError`, or :func:`_fail` where the shape is right but
the answer is not); the last tests take internals away to show that it does.
"""

from __future__ import annotations

import pathlib
import threading
import tomllib
import types

import optuna
import optuna.storages._heartbeat
import optuna.storages._rdb.models
import optuna.storages._rdb.storage
import optuna.storages.journal._storage
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from packaging.requirements import Requirement

import fathom_tune
from fathom_tune.storage import optuna_internals as oi
from fathom_tune.storage.bulk import add_trials, set_study_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
ROOT = pathlib.Path(__file__).resolve().parents[2]
KINDS = ["memory", "journal", "sqlite", "sqlite-cached"]


def _fail(internal: str, what: str):
    pytest.fail(f"Optuna {optuna.__version__}: the internal {internal} {what}", pytrace=False)


def _storage(kind: str, path: pathlib.Path):
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{path}.log"))
    if kind == "sqlite-cached":  # what optuna.create_study(storage=url) builds
        return optuna.storages.get_storage(f"sqlite:///{path}.db")
    return fathom_tune.open_storage(f"sqlite:///{path}.db")


def _template(i: int) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        value=float(i),
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        user_attrs={"u": i},
        system_attrs={"s": [i]},
        intermediate_values={0: 1.0, 1: float("nan")},
    )


def test_the_supported_range_is_pyproject_s_and_holds_the_installed_optuna():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optuna_req = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "optuna")
    assert str(optuna_req.specifier) == str(Requirement(f"optuna{oi.SUPPORTED}").specifier)
    assert any(spec.operator in ("<", "<=") for spec in optuna_req.specifier), "optuna needs an upper bound"
    if not optuna_req.specifier.contains(optuna.__version__):
        _fail("set", f"is not in the supported range optuna{oi.SUPPORTED}")


@pytest.mark.parametrize("kind", KINDS)
def test_study_and_trial_ids_are_the_ones_the_storage_looks_up(tmp_path, kind):
    study = optuna.create_study(storage=_storage(kind, tmp_path / "s"), study_name="s")
    storage = oi.storage_of(study)
    if not isinstance(storage, optuna.storages.BaseStorage):
        _fail("optuna.Study._storage", f"is a {type(storage).__name__}, not a BaseStorage")
    if oi.study_id_of(study) != storage.get_study_id_from_name("s"):
        _fail("optuna.Study._study_id", "is not the storage's id of the study")
    study.enqueue_trial({"x": 0.5})
    live = study.ask()
    public = storage.get_trial_id_from_study_id_trial_number(oi.study_id_of(study), live.number)
    if oi.trial_id_of(live) != public:
        _fail("optuna.Trial._trial_id", "is not the storage's id of the trial")
    if oi.trial_id_of(study.get_trials(deepcopy=False)[0]) != public:
        _fail("optuna.FrozenTrial._trial_id", "is not the storage's id of the trial")


@pytest.mark.parametrize("kind", KINDS)
def test_trial_attrs_are_set_and_read_by_id(tmp_path, kind):
    study = optuna.create_study(storage=_storage(kind, tmp_path / "s"), study_name="s")
    live = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    oi.set_trial_user_attr(study, frozen, "stale", True)
    oi.set_trial_system_attr(study, frozen, "rejected", "why")
    if oi.trial_system_attrs(live).get("rejected") != "why":
        _fail("storage.get_trial_system_attrs(trial._trial_id)", "does not read what was set")
    again = study.get_trials(deepcopy=True)[0]
    assert again.user_attrs == {"stale": True} and again.system_attrs.get("rejected") == "why"


@pytest.mark.parametrize("kind", KINDS)
def test_a_running_trial_is_continued_in_place(tmp_path, kind):
    study = optuna.create_study(storage=_storage(kind, tmp_path / "s"), study_name="s")
    first = study.ask()
    x = first.suggest_float("x", 0.0, 1.0)
    first.report(0.25, step=1)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    resumed = oi.resume_trial(study, running)
    assert resumed.number == first.number and resumed.suggest_float("x", 0.0, 1.0) == x
    study.tell(resumed, 1.0)
    (done,) = study.get_trials(deepcopy=False)
    assert done.state == TrialState.COMPLETE and done.intermediate_values == {1: 0.25}


def test_the_heartbeat_runs_around_a_trial_on_an_rdb_storage(tmp_path):
    storage = fathom_tune.open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=(1, 2))
    study = optuna.create_study(storage=storage, study_name="s")
    if not oi.retries_stale_trials(study):
        _fail("optuna.storages._heartbeat.BaseHeartbeat", "is not what an RDB storage with a heartbeat is")
    trial = study.ask()
    beats = []
    real = storage.record_heartbeat
    storage.record_heartbeat = lambda trial_id: (beats.append(trial_id), real(trial_id))
    with oi.trial_heartbeat(study, trial):
        pass
    if beats[:1] != [oi.trial_id_of(trial)]:
        _fail("optuna.storages._heartbeat.get_heartbeat_thread", f"recorded {beats}, not one beat of the trial")
    threads = threading.active_count()
    for kind in KINDS:  # no heartbeat: nothing runs, nothing is retried
        other = optuna.create_study(storage=_storage(kind, tmp_path / kind))
        with oi.trial_heartbeat(other, other.ask()):
            assert threading.active_count() == threads
        assert not oi.retries_stale_trials(other)


@pytest.mark.parametrize("kind", KINDS)
def test_the_rdb_and_the_journal_file_are_found_behind_each_storage(tmp_path, kind):
    storage = _storage(kind, tmp_path / "s")
    rdb = oi.rdb_behind(storage)
    if kind.startswith("sqlite") and not isinstance(rdb, optuna.storages.RDBStorage):
        _fail("optuna.storages._cached_storage._CachedStorage._backend", "is not the RDBStorage behind the cache")
    if not kind.startswith("sqlite"):
        assert rdb is None
    assert oi.journal_appends_in_place(storage) == (kind == "journal")


@pytest.mark.parametrize("kind", KINDS)
def test_batched_trials_and_study_attrs_read_back_as_optuna_writes_them(tmp_path, kind):
    studies = {}
    for how in ("batched", "optuna"):  # batched first: its checks fire before Optuna's own code
        study = optuna.create_study(storage=_storage(kind, tmp_path / how), study_name="s")
        if how == "optuna":
            study.add_trials([_template(i) for i in range(3)])
            for key, value in {"a": 1, "b": [2]}.items():
                study.set_user_attr(key, value)
        else:
            add_trials(study, [_template(i) for i in range(3)])
            set_study_attrs(study, {"a": 1, "b": [2]})
        studies[how] = study

    def fields(study):
        return [
            (t.number, t.state, t.value, t.params, t.user_attrs, t.system_attrs, repr(t.intermediate_values))
            for t in study.trials
        ] + [study.user_attrs]

    if fields(studies["batched"]) != fields(studies["optuna"]):
        _fail("storage layout (optuna.storages._rdb.models, JournalOperation)", "reads back otherwise")


# ------------------------------------------------------------------ the checks can fail
def _sqlite_study(tmp_path) -> optuna.Study:
    return optuna.create_study(storage=fathom_tune.open_storage(f"sqlite:///{tmp_path}/f.db"), study_name="s")


@pytest.mark.parametrize(
    "module, name, internal",
    [
        (optuna.storages._rdb.storage, "_create_scoped_session", "optuna.storages._rdb.storage._create_scoped_session"),
        (optuna.storages._rdb.models, "TrialParamModel", "optuna.storages._rdb.models.TrialParamModel"),
    ],
)
def test_a_missing_internal_is_named_with_the_optuna_version(tmp_path, monkeypatch, module, name, internal):
    study = _sqlite_study(tmp_path)
    monkeypatch.delattr(module, name)
    with pytest.raises(oi.OptunaInternalsError) as info:
        add_trials(study, [_template(0)])
    assert internal in str(info.value) and f"Optuna {optuna.__version__}" in str(info.value)
    monkeypatch.undo()
    assert study.trials == []  # refused before anything was written


def test_a_renamed_column_is_named(tmp_path, monkeypatch):
    study = _sqlite_study(tmp_path)
    real = optuna.storages._rdb.models.TrialValueModel
    columns = {("val" if k == "value" else k): c for k, c in real.__table__.c.items()}
    stand_in = types.SimpleNamespace(__table__=types.SimpleNamespace(c=columns), value_to_stored_repr=real.value_to_stored_repr)
    monkeypatch.setattr(optuna.storages._rdb.models, "TrialValueModel", stand_in)
    with pytest.raises(oi.OptunaInternalsError, match=r"TrialValueModel, which has no column value in the installed Optuna"):
        add_trials(study, [_template(0)])


def test_a_changed_signature_is_named(tmp_path, monkeypatch):
    storage = fathom_tune.open_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=(1, 2))
    study = optuna.create_study(storage=storage, study_name="s")
    monkeypatch.setattr(optuna.storages._heartbeat, "get_heartbeat_thread", lambda storage, trial_id: None)
    with pytest.raises(oi.OptunaInternalsError, match=r"get_heartbeat_thread, which takes \(storage, trial_id\)"):
        oi.trial_heartbeat(study, study.ask())


@pytest.mark.parametrize(
    "call, internal",
    [
        (lambda study: oi.storage_of(study), "optuna.Study._storage"),
        (lambda study: oi.study_id_of(study), "optuna.Study._study_id"),
        (lambda study: add_trials(study, [_template(0)]), "optuna.Study._storage"),
    ],
)
def test_a_missing_attribute_is_named(monkeypatch, call, internal):
    study = optuna.create_study()
    monkeypatch.delattr(study, internal.rsplit(".", 1)[1])
    with pytest.raises(oi.OptunaInternalsError, match=rf"internal {internal}, which is missing in the installed Optuna"):
        call(study)


def test_a_missing_journal_operation_is_named(tmp_path, monkeypatch):
    study = optuna.create_study(storage=_storage("journal", tmp_path / "j"), study_name="s")
    monkeypatch.delattr(optuna.storages.journal._storage, "JournalOperation")
    with pytest.raises(oi.OptunaInternalsError, match=r"internal optuna\.storages\.journal\._storage\.JournalOperation"):
        add_trials(study, [_template(0)])
