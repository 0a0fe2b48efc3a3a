"""Where scoring runs (``--executor``): in this process (``LocalExecutor``), or a plugin's
(entry points ``distillprompt.executors``: Ray's actor pool, ``ray_jobs``)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from . import templates
from .context import RunContext
from .engine import Callback
from .errors import UserError
from .evaluation import Evaluator, InProcessEvaluator
from .settings import Settings

EXECUTOR_PLUGINS = "distillprompt.executors"


class Executor(Protocol):
    """Where scoring runs. Opened before the task is loaded, so slow start-ups overlap it."""

    def evaluator(self, context: RunContext) -> Evaluator: ...

    def callback(self) -> Callback | None:
        """What of the run's events the executor follows, when it opened for this run (to
        wind down early, to record itself); None: nothing."""

    async def aclose(self) -> None: ...


def evaluator_options(context: RunContext) -> dict[str, Any]:
    """The evaluator's answer budget and the progress display's request counters."""
    progress = context.progress
    return dict(
        max_tokens=templates.answer_budget(context.task, context.settings.llm),
        on_request_done=progress.requests_done if progress else None,
        on_requests_planned=progress.requests_planned if progress else None,
    )


class LocalExecutor:
    """Scores in this process: for small runs, notebooks and tests."""

    def evaluator(self, context: RunContext) -> Evaluator:
        return InProcessEvaluator(context.task, context.target_llm, **evaluator_options(context))

    def callback(self) -> Callback | None:
        return None

    async def aclose(self) -> None:
        return None


def open_executor(settings: Settings) -> Executor:
    """The executor the settings name; others than ``local`` are plugins (entry points)."""
    if settings.executor == "local":
        return LocalExecutor()
    for entry in entry_points(group=EXECUTOR_PLUGINS):
        if entry.name == settings.executor:
            return entry.load()(settings)
    raise UserError(
        f"executor {settings.executor!r} is not installed: reinstall the package (pip install -e .) or use --executor local"
    )
