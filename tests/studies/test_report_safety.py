"""Safe by default: reports escape every name, storage URLs are masked, dashboards bind to localhost.

Names in a report come from the storage (task, tuner and metric names, the
storage's own text), so they may hold anything: the HTML report must show
them as text, and the markdown report must neither break its tables nor
pass raw HTML to a markdown renderer.
"""

from __future__ import annotations

import pathlib
import re

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import fathom_tune
from studies import _cli, compare, fathom
from studies.report import build_report, markdown_escape, markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = "<script>alert(1)</script>|x"
TASK = "<img src=x onerror=alert(1)>|x"
TUNER = "`rm -rf`<b onclick=alert(1)>|t"  # no "/": study names split on it
DASHBOARD = "optuna-dashboard --host 127.0.0.1"


def _hostile_storage(tmp_path: pathlib.Path) -> str:
    """A journal file whose path holds ``SCRIPT`` and a URL-like password ``secret``."""
    path = f"{tmp_path}/{SCRIPT}/s://bob:secret@db/j.log"
    pathlib.Path(path).parent.mkdir(parents=True)
    return path


def _studies(storage, metric: str) -> None:
    """A one-run study (4 rounds) and a search study (one 4-round run) of task ``TASK``,
    written through the run record with hostile names everywhere."""
    from fathom_tune import Cost, HParams, Target, record

    target = Target(metric, 0.9)
    dist = {"learning_rate": FloatDistribution(1e-4, 10.0, log=True)}
    header = {"task": TASK, "seed": 0, "target": target, "rounds_per_run": 4}
    outcome = {"hparams": HParams(0.1, 1.0, 10.0), "validation": {metric: 0.95}, "test": {metric: 0.8}}
    one = optuna.create_study(study_name=f"{TASK}/fathom/seed0", storage=storage)
    record.write_header(one, tuner="fathom", unit="round", budget_rounds=4, **header)
    for r, val in enumerate([None, 0.5, None, 0.95]):
        evals = [record.evaluation(1, 10, {metric: val})] if val else []
        user = {"round": r, "local_steps": 1, "cost": Cost(rounds=1, examples=10).as_dict(), "evals": evals}
        one.add_trial(create_trial(params={"learning_rate": 0.1}, distributions=dist, value=1.0, user_attrs=user))
    record.write_outcome(one, ledger=Cost(rounds=4, examples=40), **outcome)
    base = optuna.create_study(study_name=f"{TASK}/{TUNER}/seed0", storage=storage, direction="maximize")
    record.write_header(base, tuner=TUNER, unit="run", budget_rounds=8, config={SCRIPT: TUNER}, **header)
    ledger = Cost(rounds=4, examples=40, steps=4, bytes_down=1, bytes_up=1, seconds=1.0)
    base.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            params={"learning_rate": 0.1},
            distributions=dist,
            value=0.92,
            intermediate_values={2: 0.6, 4: 0.92},
            user_attrs={
                "cost": ledger.as_dict(),
                "evals": [record.evaluation(2, 20, {metric: 0.6}), record.evaluation(4, 40, {metric: 0.92})],
            },
        )
    )
    record.write_outcome(base, ledger=ledger, **outcome)


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_escape_leaves_no_markup_and_plain_text_readable():
    text = markdown_escape(SCRIPT + "\n`code` [a](javascript:x) \\| &amp; <b>")
    assert re.search(r"(?<!\\)<[A-Za-z/]", text) is None and "\n" not in text  # no tag can start
    assert "&amp;" not in text.replace("\\&amp;", "")  # no entity is decoded
    # only what markdown needs is escaped: comparisons and angle words stay readable
    assert markdown_escape("accuracy >= 0.9 for <tuner> & co") == "accuracy >= 0.9 for \\<tuner> & co"
    assert _unescaped_pipes(text) == 0
    assert "`" not in text.replace("\\`", "") and "[" not in text.replace("\\[", "")
    table = markdown_table(pd.DataFrame({SCRIPT: [TUNER], "b": ["a\\|b"]}))
    assert {_unescaped_pipes(ln) for ln in table.splitlines()} == {3}


def test_report_escapes_hostile_names_and_masks_the_storage(tmp_path):
    storage = _hostile_storage(tmp_path)
    _studies(fathom_tune.open_storage(storage), metric=SCRIPT)
    out = tmp_path / "out"
    build_report(storage, TASK, out)
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()

    for raw in ("<script", "</script>", "<img src=x", "<b onclick", "alert(1)>"):
        assert raw not in page, raw
    for tag in ("<script", "</script>", "<img src=x", "<b onclick"):  # markdown: no tag opens
        assert re.search(r"(?<!\\)" + re.escape(tag), md) is None, tag
    for text in (SCRIPT, TASK, TUNER):  # shown, as text
        assert text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page
        assert markdown_escape(text) in md
    for name in ("report.md", "summary.md", "per_seed.md"):
        tables = re.findall(r"(?:^\|.*\n?)+", (out / name).read_text(), flags=re.MULTILINE)
        assert tables, name
        for table in tables:  # a name's pipe never adds a column
            assert len({_unescaped_pipes(ln) for ln in table.splitlines()}) == 1, table
    for f in out.iterdir():
        if f.suffix in (".md", ".html", ".csv"):
            assert "secret" not in f.read_text(), f.name
    assert "bob:***@db" in md and "bob:***@db" in page
    assert DASHBOARD in md and DASHBOARD in page


def test_clis_print_masked_storage_and_a_localhost_dashboard(tmp_path, capsys):
    storage = _hostile_storage(tmp_path)
    assert fathom.main(["--rounds", "2", "--storage", storage]) == 0
    argv = ["--tuners", "fathom", "--rounds", "2", "--seeds", "0", "--no-progress"]
    argv += ["--storage", storage, "--out", str(tmp_path / "out")]
    assert compare.main(argv) == 0
    printed = capsys.readouterr()
    assert "secret" not in printed.out + printed.err
    assert printed.out.count(f"{DASHBOARD} ") == 2
    assert "bob:***@db" in printed.out
    assert "secret" not in (tmp_path / "out" / "digits" / "report.md").read_text()


DOCUMENTS = ["README.md", "reports/README.md", "studies/*.py", "fathom_tune/*.py", "baselines/*.py"]


@pytest.mark.parametrize("pattern", DOCUMENTS)
def test_every_dashboard_command_binds_to_localhost(pattern):
    files = sorted(ROOT.glob(pattern))
    assert files
    for f in files:
        for line in f.read_text().splitlines():
            # "optuna-dashboard <anything but --host 127.0.0.1>" is a command without it
            bad = re.search(r"optuna-dashboard\s+(?!--host 127\.0\.0\.1\b)[^\s,;.)\"']", line)
            assert bad is None, f"{f.relative_to(ROOT)}: {line.strip()}"


def test_dashboard_command_masks_the_password():
    command = _cli.dashboard_command("postgresql://bob:secret@db:5432/optuna")
    executable, rest = command.split(" ", 1)
    assert rest == "--host 127.0.0.1 postgresql://bob:***@db:5432/optuna"
    assert pathlib.Path(executable).name == "optuna-dashboard"
