"""Every ```python block of README.md runs as written (in a temporary directory)."""

import pathlib
import re
import runpy

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(BLOCKS):
        script = tmp_path / f"block_{i}.py"
        script.write_text(block)
        namespace = runpy.run_path(str(script), init_globals=namespace, run_name="readme")
    out = capsys.readouterr().out
    assert "rounds to target:" in out and "next round:" in out
    assert (tmp_path / "fathom.db").exists()


@pytest.mark.parametrize("command", ["python -m studies.compare --quick", "python -m pytest"])
def test_readme_quick_start_has_the_two_commands(command):
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    lines = [ln for ln in quick.splitlines() if ln.startswith("python3 -m venv")]
    assert len(lines) == 2
    assert any(ln.endswith(command.replace("python", ".venv/bin/python", 1)) for ln in lines)
