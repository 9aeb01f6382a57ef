"""Every example in the package's docstrings runs and prints what it says.

One test per module whose docstrings hold an example (``>>>``); a module that
needs an extra that is not installed (Flower) is skipped, saying which.
"""

import doctest
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("fathom_tune", "baselines", "studies")


def _modules_with_examples() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if ">>> " in path.read_text(encoding="utf-8"):
                parts = path.relative_to(ROOT).with_suffix("").parts
                out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


MODULES = _modules_with_examples()


def test_the_packages_have_examples_to_run():
    assert len(MODULES) >= 30
    assert "fathom_tune.engine.batching" in MODULES and "baselines._objective" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if err.name and err.name.split(".")[0] == "flwr":
            pytest.skip(f"{name} needs the flower extra: {err}")
        raise
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.attempted > 0, f"{name}: no example found"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (printed above)"
