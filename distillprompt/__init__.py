"""DistillPrompt: LLM-driven prompt optimization (rewrite, distill, compress, aggregate, paraphrase).

The names below are imported on first use, not with the package: the registered pyfunc model
(``mlflow_project/prompt_model.py``) imports ``distillprompt.metrics`` in an environment built
from the model's own requirements (mlflow, openai, pandas), where the settings' pydantic-settings
is not installed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import EndpointUnavailable, UserError
    from .settings import Settings, load_settings

__all__ = ["EndpointUnavailable", "Settings", "UserError", "load_settings"]
__version__ = "0.1.0"

_HOMES = {"EndpointUnavailable": "errors", "UserError": "errors", "Settings": "settings", "load_settings": "settings"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
