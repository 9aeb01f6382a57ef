"""The round loop, as users import it: :mod:`fathom_tune.tuning.loop` under its short name.

Example:
    >>> from fathom_tune import loop
    >>> from fathom_tune.tuning import loop as tuning_loop
    >>> loop.run is tuning_loop.run
    True
"""

from fathom_tune.tuning.loop import *  # noqa: F403 - every name in its __all__
from fathom_tune.tuning.loop import __all__  # noqa: F401
