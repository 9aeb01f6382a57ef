"""Every ```python block of README.md and of every docs/*.md page runs as written (in a
temporary directory); the README stays short, and every relative link resolves."""

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)
BLOCKS = PYTHON_BLOCK.findall(README.read_text())
QUICK_START_COMMANDS = ["python -m studies.compare --quick", "python -m pytest"]
MAX_README_LINES = 250


def _run_alone_twice(blocks, tmp_path, capsys) -> list[str]:
    # A user pastes each snippet into a fresh script and runs it, then runs it again:
    # it needs nothing from another snippet, and the second run continues or repeats.
    outputs = []
    for i, block in enumerate(blocks):
        script = tmp_path / f"block_{i}.py"
        script.write_text(block)
        printed = []
        for _ in range(2):
            runpy.run_path(str(script), run_name="__main__")
            printed.append(capsys.readouterr().out)
        assert printed[0], f"block {i} prints nothing"
        if "optimize(" in block and "checkpoint=" in block or "baselines.run(" in block:
            assert printed[1] == printed[0], f"block {i}: a re-run of a finished run reports it as it was"
        outputs.append(printed[0])
    return outputs


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


def test_each_readme_python_block_runs_alone_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    everything = "".join(_run_alone_twice(BLOCKS, tmp_path, capsys))
    assert "rounds to target:" in everything and "next round:" in everything
    assert (tmp_path / "fathom.db").exists() and (tmp_path / "fathom.npz").exists()


def test_the_docs_pages_exist():
    names = {p.name for p in DOCS}
    assert {"ARCHITECTURE.md", "tasks.md", "sampler.md", "compare.md", "reliability.md"} <= names
    assert (ROOT / "docs" / "compare_digits_best_vs_rounds.png").exists()


@pytest.mark.parametrize("page", [p for p in DOCS if PYTHON_BLOCK.search(p.read_text())], ids=lambda p: p.name)
def test_each_docs_python_block_runs_alone_twice(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run_alone_twice(PYTHON_BLOCK.findall(page.read_text()), tmp_path, capsys)


def test_the_docs_hold_the_ask_and_tell_loop():
    # the sampler page's loop ends by printing the next round's hyperparameters
    blocks = PYTHON_BLOCK.findall((ROOT / "docs" / "sampler.md").read_text())
    assert any('print("next round:"' in b for b in blocks)


@pytest.mark.parametrize("command", QUICK_START_COMMANDS)
def test_readme_quick_start_has_the_two_commands(command):
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    lines = [ln for ln in quick.splitlines() if ln.startswith("python3 -m venv")]
    assert len(lines) == 2
    assert any(ln.endswith(command.replace("python", ".venv/bin/python", 1)) for ln in lines)


def test_readme_is_short_and_the_quick_start_is_on_the_first_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES
    first = lines[:40]
    assert "## Quick start" in first
    for command in QUICK_START_COMMANDS:
        wanted = command.replace("python", ".venv/bin/python", 1)
        assert any(ln.startswith("python3 -m venv") and ln.endswith(wanted) for ln in first), command


def _anchors(text: str) -> set[str]:
    # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.DOTALL), flags=re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), f"{doc.name}: {target}"
