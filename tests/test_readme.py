"""Every ```python block of README.md runs as written (in a temporary directory)."""

import pathlib
import re
import runpy

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


def test_each_readme_python_block_runs_alone_twice(tmp_path, monkeypatch, capsys):
    # A user pastes each snippet into a fresh script and runs it, then runs it again:
    # it needs nothing from another snippet, and the second run continues or repeats.
    monkeypatch.chdir(tmp_path)
    outputs = []
    for i, block in enumerate(BLOCKS):
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
    everything = "".join(outputs)
    assert "rounds to target:" in everything and "next round:" in everything
    assert (tmp_path / "fathom.db").exists() and (tmp_path / "fathom.npz").exists()


@pytest.mark.parametrize("command", ["python -m studies.compare --quick", "python -m pytest"])
def test_readme_quick_start_has_the_two_commands(command):
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    lines = [ln for ln in quick.splitlines() if ln.startswith("python3 -m venv")]
    assert len(lines) == 2
    assert any(ln.endswith(command.replace("python", ".venv/bin/python", 1)) for ln in lines)
