"""The run's budgets: LLM calls, tokens, scoring requests and dollars (``--max-cost``, kept by
``cost.CostCap``)."""

from __future__ import annotations

from ..cost import CostCap
from ..llm import Usage, UsageMeter
from ..settings import OptimizerSettings
from .events import MAX_COST, TEST_SCORING
from .scoring import Scoring


class Budgets:
    """Says, at the end of a stage, whether a budget ran out (the stop reason) or not (None).
    Every call the run made counts, served by the cache or not, so that a rerun stops at the
    same stage; scoring in flight is counted once it has finished."""

    def __init__(self, settings: OptimizerSettings, meter: UsageMeter, scoring: Scoring,
                 cost_cap: CostCap | None = None) -> None:
        self.settings = settings
        self.meter = meter
        self.scoring = scoring
        self.cost_cap = cost_cap

    @property
    def any(self) -> bool:
        settings = self.settings
        return bool(settings.max_calls or settings.max_total_tokens or settings.max_scoring_calls or self.cost_cap)

    def mark(self) -> None:
        """A round starts: what a stage costs is counted from here."""
        if self.cost_cap is not None:
            self.cost_cap.round_started()

    def new_best(self, prompt: str, initial: str) -> None:
        """``--max-cost``: the best prompt's test scoring, at the end, carries its length."""
        if self.cost_cap is not None:
            self.cost_cap.reserve_for_best(prompt, initial, len(self.scoring.task.test))

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
        if self.cost_cap is not None and not self.cost_cap.next_stage_fits():
            return MAX_COST
        return None

    def scoring_left(self) -> int | None:
        """Scoring requests left under ``max_scoring_calls`` (None when there is no such budget)."""
        budget = self.settings.max_scoring_calls
        return max(0, budget - self.scoring.spent()) if budget else None
