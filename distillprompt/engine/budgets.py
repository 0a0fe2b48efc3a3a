"""The run's budgets: LLM calls, tokens, scoring requests and dollars (``--max-cost``)."""

from __future__ import annotations

from ..llm import CostGuard, Usage, UsageMeter, text_tokens
from ..settings import OptimizerSettings
from .events import MAX_COST, TEST_SCORING
from .scoring import Scoring


class Budgets:
    """Says, at the end of a stage, whether a budget ran out (the stop reason) or not (None).
    Every call the run made counts, served by the cache or not, so that a rerun stops at the
    same stage; scoring in flight is counted once it has finished."""

    def __init__(self, settings: OptimizerSettings, meter: UsageMeter, scoring: Scoring,
                 cost_guard: CostGuard | None = None) -> None:
        self.settings = settings
        self.meter = meter
        self.scoring = scoring
        # --max-cost: the guard refuses any request past the budget (``llm/client.py``); here a
        # round stops at the end of a stage when the next stage, as costly as the costliest so
        # far, would not fit, so that the run ends on finished stages, where a rerun ends too
        self.cost_guard = cost_guard
        self._spent_at_mark = 0.0
        self._costliest_stage = 0.0

    @property
    def any(self) -> bool:
        settings = self.settings
        return bool(settings.max_calls or settings.max_total_tokens or settings.max_scoring_calls or self.cost_guard)

    def mark(self) -> None:
        """A round starts: what a stage costs is counted from here."""
        if self.cost_guard is not None:
            self._spent_at_mark = self.cost_guard.spent()

    def new_best(self, prompt: str, initial: str) -> None:
        """``--max-cost``: the best prompt's test scoring, at the end, carries its length; what
        it has more than the initial prompt (the estimate's) is held back from the search."""
        if self.cost_guard is not None:
            more = text_tokens(prompt) - text_tokens(initial)
            self.cost_guard.hold_back_tokens(more * len(self.scoring.task.test))

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
        guard = self.cost_guard
        if guard is not None:
            cost = guard.spent()
            self._costliest_stage = max(self._costliest_stage, cost - self._spent_at_mark)
            self._spent_at_mark = cost
            if cost + self._costliest_stage >= guard.limit:
                return MAX_COST
        return None

    def scoring_left(self) -> int | None:
        """Scoring requests left under ``max_scoring_calls`` (None when there is no such budget)."""
        budget = self.settings.max_scoring_calls
        return max(0, budget - self.scoring.spent()) if budget else None
