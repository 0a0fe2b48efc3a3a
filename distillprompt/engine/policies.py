"""The policies a run is made of: how a method proposes candidates (``Method``), how the
best is chosen among them (``Selection``) and when the run stops (``StopRule``). Each is a
small object with one job; a method of one's own subclasses ``Method``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..llm import text_tokens
from ..settings import OptimizerSettings
from ..state import Candidate, RunState
from .events import FLAT_SIGNAL, RoundResult

if TYPE_CHECKING:  # the round is handed to these policies; they never build one
    from .round import Round


class Selection:
    """Picks the best prompt once a round's candidates are scored."""

    uses_validation = False  # whether the loop scores the initial prompt on the validation sample
    # whether a candidate that is clearly worse than the best prompt can never be chosen, so
    # that ``--scoring race`` may stop scoring it early (a selection that keeps whatever the
    # method built, such as ``LatestCandidate``, needs every score in full)
    races = False

    async def choose(self, current: Round, new: list[Candidate]) -> Candidate:
        raise NotImplementedError


class HighestScore(Selection):
    """Without a validation sample: the highest train score, in creation order, strict >, so
    ties keep the older prompt (the paper's rule). With one: the round's ``top`` new distinct
    candidates with the highest train scores are scored on the validation sample, and the
    best prompt so far is replaced by the one of them with the highest validation score, if
    it is strictly higher than the best's; ties keep the older prompt. Train proposes,
    validation decides, so a small train sample cannot crown a prompt that only fits it.
    Either way a candidate that a race stopped (``--scoring race``) is never chosen."""

    uses_validation = True
    races = True

    def __init__(self, top: int = 3, prefer_shorter: bool = False) -> None:
        self.top = top
        self.prefer_shorter = prefer_shorter

    async def choose(self, current: Round, new: list[Candidate]) -> Candidate:
        best = current.best
        if not current.validating:
            for candidate in new:
                if candidate.selectable and (candidate.score or 0.0) > (best.score or 0.0):
                    best = candidate
            if self.prefer_shorter:
                pool = [current.best, *(c for c in new if c.selectable and c.duplicate_of is None)]
                best = shortest_near(pool, best, lambda c: c.score, len(current.task.train), current.history)
            return best
        distinct = [c for c in new if c.duplicate_of is None and c.selectable]
        # highest train score first; at equal score the older candidate
        top = sorted(distinct, key=lambda c: (-(c.score or 0.0), c.id))[: self.top]
        await current.score_validation([c for c in top if c.val_score is None])
        for candidate in sorted(top, key=lambda c: c.id):
            if candidate.val_score is not None and candidate.val_score > (best.val_score or 0.0):
                best = candidate
        if self.prefer_shorter:
            pool = [current.best, *(c for c in top if c.val_score is not None)]
            best = shortest_near(pool, best, lambda c: c.val_score, len(current.task.val), current.history)
        return best


def shortest_near(pool: list[Candidate], best: Candidate, score: Callable[[Candidate], float | None],
                  examples: int, history: list[Candidate]) -> Candidate:
    """``--prefer-shorter``: of the candidates within one example's worth (1/examples) of the
    best score the run has seen (``history``, so that shorter prompts chosen round after round
    never drift further below it), the one with the fewest tokens (at equal length the older
    one)."""
    seen = [score(c) for c in history if c.selectable and score(c) is not None]
    top = max([score(best) or 0.0, *seen])  # type: ignore[type-var]
    margin = 1.0 / max(1, examples) + 1e-9
    near = [c for c in pool if (score(c) or 0.0) >= top - margin]
    return min(near, key=lambda c: (text_tokens(c.prompt), c.id), default=best)


class LatestCandidate(Selection):
    """The round's last candidate, whatever its score (a method that builds its result rather
    than searching for it, such as ``fewshot``)."""

    async def choose(self, current: Round, new: list[Candidate]) -> Candidate:
        # a result equal to a prompt seen before is that prompt (the initial one: nothing changed)
        return current.original(new[-1]) if new else current.best


class StopRule:
    """Ends the run after a round; ``check`` returns a stop reason or None."""

    def check(self, state: RunState, result: RoundResult) -> str | None:
        raise NotImplementedError


class Patience(StopRule):
    """Stops after ``rounds`` rounds in a row that did not change the best prompt (0: never)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def check(self, state: RunState, result: RoundResult) -> str | None:
        return "patience" if self.rounds and state.stale_rounds >= self.rounds else None


class FlatSignal(StopRule):
    """Stops after ``rounds`` rounds in a row whose scores carried no signal (see ``diagnosis``)."""

    def __init__(self, rounds: int = 2) -> None:
        self.rounds = rounds

    def check(self, state: RunState, result: RoundResult) -> str | None:
        return FLAT_SIGNAL if state.flat_rounds >= self.rounds else None


class Method:
    """How a method proposes candidates; the loop does the rest (scoring, selection, stopping
    rules, budgets, events, resume, the test-sample verdict).

    A method names itself (``name``), says how many rounds it runs, which rounds-without-gain
    patience applies and how its winner is selected, and in ``propose`` adds one round's
    candidates through the ``Round`` it is given. What it must keep between rounds goes in
    ``current.method_state`` (saved with the run state). Hand an instance to
    ``Optimizer(method=...)``; the built-in ones are listed in ``methods.METHODS`` (``--method``)."""

    name = ""

    def rounds(self, settings: OptimizerSettings) -> int:
        """How many rounds the method runs at most (0: the initial prompt is the result)."""
        return settings.rounds

    def patience(self, settings: OptimizerSettings) -> int:
        return settings.patience

    def selection(self, settings: OptimizerSettings) -> Selection:
        return HighestScore(settings.val_top, settings.prefer_shorter)

    def with_scoring_budget(self, settings: OptimizerSettings, budget: int, train_size: int) -> OptimizerSettings:
        """The settings that hold the method to ``budget`` scoring requests (compare's
        ``--budget-match``): a search stops before a candidate would pass it. A method that
        builds its one result rather than searching keeps its settings."""
        return settings.model_copy(update={"max_scoring_calls": budget})

    async def propose(self, current: Round) -> None:
        """Adds the round's candidates (``current.ask``, ``current.admit``, ``current.add``) and
        closes each stage with ``current.end_stage``; returns early when that says stop."""
        raise NotImplementedError

    def accepted(self, current: Round, candidate: Candidate) -> None:
        """The selection made ``candidate`` the best prompt (called only when the best changed)."""
