"""The public surface every tuner shares: argument checks, the registry, the result type,
the run record, storages; and what the architecture promises about the code itself."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import optuna
import pytest
from _toy import toy_task

import baselines
import fathom_tune
from fathom_tune import Cost, HParams, Target, checks, record, tuners
from fathom_tune.storage import mask_url

ROOT = pathlib.Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ checks: one type per mistake
@pytest.mark.parametrize(
    "check, value, error, message",
    [
        (checks.seed, -1, ValueError, "seed must be an int >= 0, got -1"),
        (checks.seed, True, TypeError, "seed must be an int, got True (bool)"),
        (checks.seed, 1.0, TypeError, "seed must be an int, got 1.0 (float)"),
        (checks.positive_int, 0, ValueError, "seed must be >= 1, got 0"),
        (checks.positive_finite, float("inf"), ValueError, "seed must be a finite number > 0, got inf"),
        (checks.nonnegative_real, "1", TypeError, "seed must be a real number, got '1' (str)"),
        (checks.fraction, 1.0, ValueError, "seed must be in the open interval (0, 1), got 1.0"),
        (checks.boolean, 1, TypeError, "seed must be a bool, got 1 (int)"),
    ],
)
def test_checks_name_the_argument_the_value_and_what_is_allowed(check, value, error, message):
    with pytest.raises(error) as info:
        check("seed", value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "call",
    [
        lambda: fathom_tune.Engine(toy_task(), seed=-2),
        lambda: fathom_tune.optimize(toy_task(), seed=-2),
        lambda: baselines.run(toy_task(), "random", budget_rounds=100, seed=-2),
        lambda: fathom_tune.tuners.get("fathom").run(toy_task(), seed=-2),
        lambda: fathom_tune.tasks.digits(seed=-2),
    ],
)
def test_every_entry_point_rejects_a_negative_seed_the_same_way(call):
    with pytest.raises(ValueError, match=r"^seed must be an int >= 0, got -2$"):
        call()


# ------------------------------------------------------------------ storages
def test_passwords_are_masked_by_sqlalchemy_even_with_a_slash():
    assert mask_url("postgresql://bob:se/cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert mask_url("mysql+pymysql://u:p%40ss@h/d") == "mysql+pymysql://u:***@h/d"
    assert mask_url("sqlite:///reports/x.db") == "sqlite:///reports/x.db"
    assert "secret" not in mask_url("/runs/odd://bob:secret@name/j.log")


def test_importable_without_fcntl_as_on_windows():
    code = "import sys; sys.modules['fcntl'] = None; import fathom_tune, baselines, studies.compare"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_the_library_prints_nothing(capsys):
    fathom_tune.optimize(toy_task(), num_rounds=2)
    baselines.run(toy_task(num_rounds=2), "random", budget_rounds=4)
    fathom_tune.fedavg(toy_task(), num_rounds=2)
    out = capsys.readouterr()
    assert out.out == "" and "fathom" not in out.err.lower()


# ------------------------------------------------------------------ tuners and their result
def test_every_registered_tuner_returns_the_same_result_type():
    task = toy_task(num_rounds=2, eval_every=1)
    results = {
        "fathom": fathom_tune.tuners.get("fathom").run(task),
        "fathom+server": fathom_tune.tuners.get("fathom+server").run(task),
        "fedex": fathom_tune.tuners.get("fedex").run(task),
        "fedhyper": fathom_tune.tuners.get("fedhyper").run(task),
        "random": fathom_tune.tuners.get("random").run(task, budget_rounds=4),
        "optimize": fathom_tune.optimize(task),
        "baselines.run": baselines.run(task, "grid", budget_rounds=4),
        "fedavg": fathom_tune.fedavg(task),
    }
    fields = [f.name for f in dataclasses.fields(fathom_tune.TuningResult)]
    for name, result in results.items():
        assert type(result) is fathom_tune.TuningResult, name
        assert isinstance(result.hparams, HParams) and isinstance(result.cost, Cost), name
        assert set(result.validation_metrics) == set(result.test_metrics) == {"accuracy", "loss"}, name
        assert result.rounds_to_target is None or isinstance(result.rounds_to_target, int), name
        assert result.params is not None and result.target == task.target, name
        assert len(result.history) >= 1 and fields == list(vars(result)), name
    assert results["fedavg"].study is None
    assert results["fathom"].cost.rounds == 2 and results["random"].cost.rounds == 4
    assert all(results[n].cost.rounds == 2 for n in ("fathom+server", "fedex", "fedhyper"))


def test_registry_lists_every_tuner_and_rejects_unknown_names_with_the_list():
    names = tuners.names()
    assert names[0] == "fathom" and set(baselines.REGISTRY) <= set(names)
    with pytest.raises(ValueError, match=r"unknown tuner 'nope'; valid tuners: fathom, fathom\+server, fathom-auto, fedex, fedex-auto, fedhyper, "):
        tuners.get("nope")
    with pytest.raises(TypeError, match="must be a fathom_tune.tuners.Tuner"):
        tuners.register(object())


def test_a_tuner_written_from_scratch_plugs_in(tmp_path):
    class Static(tuners.Tuner):
        """The task's start, once: a user's tuner in a few lines, through the record."""

        name = "static-start"

        def tune(self, request):
            study = optuna.create_study(
                study_name=request.study_name(self.name), storage=fathom_tune.open_storage(request.storage)
            )
            task = request.task
            record.write_header(
                study, task=task.name, tuner=self.name, seed=request.seed, unit="run", target=task.target,
                rounds_per_run=task.num_rounds, budget_rounds=task.num_rounds,
            )
            out = fathom_tune.fedavg(task, seed=request.seed)
            trial = study.ask()
            evals = [
                record.evaluation(r.rounds, r.examples, {"accuracy": r.val_accuracy})
                for r in out.history.dropna(subset=["val_accuracy"]).itertuples()
            ]
            record.write_step(trial, cost=out.cost, evals=evals)
            study.tell(trial, out.validation_metrics["accuracy"])
            record.write_outcome(
                study, hparams=out.hparams, validation=out.validation_metrics, test=out.test_metrics, ledger=out.cost
            )
            return tuners.result_from_record(record.read_run(study), params=out.params)

    tuners.register(Static(), replace=True)
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = tuners.get("static-start").run(toy_task(num_rounds=3, eval_every=1), storage=url)
    reference = fathom_tune.fedavg(toy_task(num_rounds=3, eval_every=1))
    assert (result.rounds_to_target, result.examples_to_target) == (
        reference.rounds_to_target,
        reference.examples_to_target,
    )
    assert record.load_runs(url, "toy")[0].ledger.examples == reference.cost.examples


# ------------------------------------------------------------------ the run record
def test_read_run_sums_trials_in_number_order_whatever_a_trial_is():
    # one-run study: 3 rounds of 10, 20, 30 examples, evaluated after rounds 2 and 3
    study = optuna.create_study()
    record.write_header(
        study, task="t", tuner="x", seed=0, unit="round", target=Target("accuracy", 0.5),
        rounds_per_run=3, budget_rounds=3,
    )
    for r, (examples, acc) in enumerate([(10, None), (20, 0.4), (30, 0.6)]):
        t = study.ask()
        evals = [] if acc is None else [record.evaluation(1, examples, {"accuracy": acc})]
        record.write_step(t, cost=Cost(rounds=1, examples=examples), evals=evals, round=r)
        study.tell(t, 1.0)
    killed = study.ask()  # a round left running by a killed process, failed on resume
    record.write_step(killed, cost=Cost(rounds=1, examples=99), evals=[])
    killed.set_user_attr(record.STALE, True)
    study.tell(killed, state=optuna.trial.TrialState.FAIL)
    run = record.read_run(study)
    assert list(run.evaluations["rounds"]) == [2, 3]
    assert list(run.evaluations["examples"]) == [30, 60]
    assert run.cost_to_target() == (3, 60)
    assert run.ledger == Cost(rounds=3, examples=60) and run.spent_steps == 3
    assert list(run.steps["cum_rounds"]) == [1, 2, 3, 3]
    with pytest.raises(ValueError, match="has no 'target_metric'"):
        record.read_run(optuna.create_study())


# ------------------------------------------------------------------ the code itself
def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_baselines_and_studies_use_only_public_fathom_tune_modules():
    private = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("baselines", "studies")
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.startswith("fathom_tune.") and any(part.startswith("_") for part in name.split(".")[1:])
    ]
    assert private == []


def test_studies_never_branch_on_a_tuner_name():
    for path in (ROOT / "studies").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not set(constants) & set(tuners.names()), f"{path.name}:{node.lineno}"


# ------------------------------------------------------------------ the floor plan, as rules
PACKAGES = ("fathom_tune", "baselines", "studies")
MAX_LINES = 400
MAX_TOP_MODULES = 8
WINGS = {  # a wing may import only wings of a lower floor (and its own)
    "ground": 0,  # fathom_tune's top modules: hparams, task, checks, _compat, _version
    "tasks": 1,
    "engine": 1,
    "storage": 2,
    "tuning": 3,
    "fathom": 4,
    "peers": 5,
    "flower": 6,
}
ALIASES = {"fathom_tune", "fathom_tune.record", "fathom_tune.tuners", "fathom_tune.loop"}
"""The names users import (re-exports of the wings): the wings themselves never import them."""


def _module_files() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULE_FILES = _module_files()


def _edges(name: str, path: pathlib.Path) -> set[str]:
    """The project modules ``name`` imports, anywhere in it (functions included): ``from a
    import b`` is an edge to ``a.b`` when that is a module, else to ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULE_FILES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULE_FILES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULE_FILES.items()}


def _wing(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fathom_tune" or module in ALIASES:
        return None
    return parts[1] if len(parts) > 2 or parts[1] in WINGS else "ground"


def test_the_rule_helpers_see_the_real_imports():
    # checks against imports read by eye: a function-level import counts, a re-export resolves
    assert "fathom_tune.engine.simulator" in GRAPH["fathom_tune.engine"]
    assert "fathom_tune.hparams" in GRAPH["fathom_tune.engine.simulator"]
    assert "fathom_tune.checks" in GRAPH["fathom_tune.hparams"]
    assert _wing("fathom_tune.storage.record") == "storage" and _wing("fathom_tune.hparams") == "ground"
    assert _wing("fathom_tune.record") is None


def test_no_module_is_over_400_lines():
    long = {
        name: n
        for name, path in MODULE_FILES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_at_most_eight_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in (ROOT / "fathom_tune").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_MODULES, top


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_private_module_is_imported_from_outside_its_own_package():
    leaks = []
    for name, targets in GRAPH.items():
        for target in targets:
            parts = target.split(".")
            private = [i for i, part in enumerate(parts) if part.startswith("_")]
            owner = ".".join(parts[: private[0]]) if private else None
            if owner is not None and name != owner and not name.startswith(owner + "."):
                leaks.append(f"{name} imports {target}")
    assert leaks == []


def test_wings_import_only_lower_floors_and_never_the_user_aliases():
    wrong = []
    for name, targets in GRAPH.items():
        wing = _wing(name)
        if wing is None:
            continue
        for target in targets:
            if target in ALIASES:
                wrong.append(f"{name} imports the alias {target}")
            elif (other := _wing(target)) and other != wing and WINGS.get(other, 0) >= WINGS.get(wing, 0):
                wrong.append(f"{name} ({wing}) imports {target} ({other})")
    assert wrong == []
