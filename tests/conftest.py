import pathlib
import sys

# Shared test helpers (tests/_toy.py) import as top-level modules.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
