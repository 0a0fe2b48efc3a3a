"""DistillPrompt: LLM-driven prompt optimization (rewrite, distill, compress, aggregate, paraphrase)."""

from .errors import EndpointUnavailable, UserError
from .settings import Settings, load_settings

__all__ = ["EndpointUnavailable", "Settings", "UserError", "load_settings"]
__version__ = "0.1.0"
