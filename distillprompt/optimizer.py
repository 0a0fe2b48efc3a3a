"""The engine's public names where earlier releases had them; their home is ``distillprompt.engine``."""

from .engine import *  # noqa: F401,F403
from .engine import __all__  # noqa: F401
