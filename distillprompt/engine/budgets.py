"""The run's budgets: LLM calls, tokens and scoring requests."""

from __future__ import annotations

from ..llm import Usage, UsageMeter
from ..settings import OptimizerSettings
from .events import TEST_SCORING
from .scoring import Scoring


class Budgets:
    """Says, at the end of a stage, whether a budget ran out (the stop reason) or not (None).
    Every call the run made counts, served by the cache or not, so that a rerun stops at the
    same stage; scoring in flight is counted once it has finished."""

    def __init__(self, settings: OptimizerSettings, meter: UsageMeter, scoring: Scoring) -> None:
        self.settings = settings
        self.meter = meter
        self.scoring = scoring

    @property
    def any(self) -> bool:
        settings = self.settings
        return bool(settings.max_calls or settings.max_total_tokens or settings.max_scoring_calls)

    async def reached(self) -> str | None:
        if not self.any:
            return None
        await self.scoring.wait()
        spent = Usage()
        for stage, usage in self.meter.snapshot().items():
            if stage != TEST_SCORING:
                spent.add(usage)
        settings = self.settings
        if settings.max_calls and spent.calls >= settings.max_calls:
            return "budget_calls"
        if settings.max_scoring_calls and self.scoring.spent() + self.scoring.candidate_cost(1) > settings.max_scoring_calls:
            return "budget_scoring"  # not even one more candidate fits
        if settings.max_total_tokens and spent.tokens + spent.cached_tokens >= settings.max_total_tokens:
            return "budget_tokens"
        return None

    def scoring_left(self) -> int | None:
        """Scoring requests left under ``max_scoring_calls`` (None when there is no such budget)."""
        budget = self.settings.max_scoring_calls
        return max(0, budget - self.scoring.spent()) if budget else None
