import os
import pathlib
import sys
import tempfile

# Shared test helpers (tests/_toy.py) import as top-level modules.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# One persistent XLA compilation cache for the whole run: the test processes,
# the pytest-xdist workers and every CLI or README block a test starts
# compile the same programs; after the first, they load them. Programs are
# keyed by their HLO, flags and backend, so a cached program is the program
# that would be compiled. Set JAX_COMPILATION_CACHE_DIR to choose the folder.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fathom-tune-tests-xla-{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
