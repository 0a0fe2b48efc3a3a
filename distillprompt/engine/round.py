"""``Round``: what a method may use during one round, and nothing else of the loop."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .. import templates
from ..candidates import Extraction
from ..data import Example, Task
from ..evaluation import Score
from ..llm import RequestRefused, text_tokens
from ..settings import OptimizerSettings
from ..state import Candidate, RunState
from .budgets import Budgets
from .events import TRAIN_SCORING, Events, StageEvent
from .examples import Mistakes, carried_demos, mistakes_in, random_examples, recorded_answers, stratified_demos
from .history import History
from .scoring import Scoring
from .writer import MetaWriter


@dataclass
class LoopParts:
    """The parts of the loop a round works through: the optimizer model (``writer``), the
    candidates (``history``), scoring, budgets and the callbacks (``events``)."""

    task: Task
    settings: OptimizerSettings
    seed: int
    validating: bool  # whether the selection compares candidates on a validation sample
    writer: MetaWriter
    history: History
    scoring: Scoring
    budgets: Budgets
    events: Events


class Round:
    """One round, as a method sees it: the best prompt so far, the run's random state, the
    optimizer model (``ask``), candidates it adds (``admit``, ``add``, sent to scoring at
    once) and the end of each stage (``end_stage``, where budgets are checked)."""

    def __init__(self, number: int, rng: random.Random, state: RunState, parts: LoopParts) -> None:
        self.number = number  # 1 for the run's first round
        self.rng = rng  # the run's random state; saved after the round, so a resumed run draws the same
        self.new: list[Candidate] = []  # the round's candidates, duplicates included, in creation order
        self.stop_reason: str | None = None  # set when a budget ran out at the end of a stage
        self._state = state
        self._parts = parts
        self._rejections_before = {stage: dict(reasons) for stage, reasons in state.rejections.items()}
        self._queued: list[Candidate] = []

    # ----- what the round knows ------------------------------------------------------------

    @property
    def task(self) -> Task:
        return self._parts.task

    @property
    def settings(self) -> OptimizerSettings:
        return self._parts.settings

    @property
    def seed(self) -> int:
        return self._parts.seed

    @property
    def best(self) -> Candidate:
        return self._state.best

    @property
    def initial(self) -> Candidate:
        return self._state.history[0]

    @property
    def history(self) -> list[Candidate]:
        return self._state.history

    @property
    def method_state(self) -> dict[str, Any]:
        """The method's own state, kept between rounds and saved with the run state."""
        return self._state.method_state

    @property
    def validating(self) -> bool:
        return self._parts.validating

    @property
    def optimizer_model(self) -> str:
        """The optimizer model's name at its endpoint."""
        return self._parts.writer.model

    @property
    def rejections(self) -> dict[str, dict[str, int]]:
        """The replies and candidates dropped during this round, by stage and reason."""
        return self._parts.history.rejections_since(self._rejections_before)

    # ----- the optimizer model -------------------------------------------------------------

    async def ask(
        self, meta: templates.MetaPrompt, temperature: float, n: int, key: str, parents: list[Candidate]
    ) -> list[Extraction]:
        """``n`` replies of the optimizer model, each cleaned into a candidate prompt or a reason
        to drop it (``MetaWriter.candidates``: a reply that repeats a parent is asked again up
        to ``--copy-retries`` times; a meta-prompt too long for the context is asked with fewer
        examples). ``key`` tells this request apart from others of the round in the response
        cache (the same key on a rerun gets the same reply)."""
        settings = self.settings
        return await self._parts.writer.candidates(
            meta, temperature, n, f"{self.number}:{key}", [parent.prompt for parent in parents],
            settings.copy_retries, settings.copy_retry_temperature,
        )

    async def ask_text(self, meta: templates.MetaPrompt, temperature: float, key: str) -> str:
        """One raw reply of the optimizer model (no cleaning), e.g. a rewritten phrase; empty
        when the endpoint refused the request (counted in the stage's usage)."""
        try:
            replies = await self._parts.writer.ask(meta, temperature, 1, f"{self.number}:{key}")
        except RequestRefused:
            return ""
        return replies[0] if replies else ""

    async def chat(self, messages: list[dict[str, Any]], temperature: float, key: str, stage: str) -> str:
        """One raw reply of the optimizer model to any messages (an outside optimizer's own
        meta-prompts), through the run's cache, retries, limiter and usage meter; empty when the
        endpoint refused the request (counted in the stage's usage)."""
        try:
            return await self._parts.writer.chat(messages, temperature, f"{self.number}:{key}", stage)
        except RequestRefused:
            return ""

    # ----- candidates ----------------------------------------------------------------------

    def admit(
        self, extractions: list[Extraction], stage: str, parents: list[Candidate], demos: list[Example] | None = None
    ) -> list[Candidate | None]:
        """Cleaned replies become candidates, sent to scoring at once (None where a reply is
        dropped, counted by reason; a template's candidate that drops or invents a variable is
        dropped too). With ``demos`` each new instruction is followed by these solved examples."""
        admitted: list[Candidate | None] = []
        for extraction in extractions:
            if extraction.prompt is None:
                reason: str | None = extraction.reason
            else:
                reason = templates.variables_problem(self.task, extraction.prompt)
                if reason is None and self.too_long(extraction.prompt, demos):
                    reason = "too_many_tokens"  # --max-prompt-tokens
            if extraction.prompt is None or reason is not None:
                self.reject(stage, reason or "unusable")
                admitted.append(None)
                continue
            admitted.append(self.add(extraction.prompt, stage, parents, demos=demos))
        self.send_to_scoring()
        return admitted

    def too_long(self, instruction: str, demos: list[Example] | None = None) -> bool:
        """Whether the prompt (the instruction and any examples after it) is longer than
        ``--max-prompt-tokens`` allows."""
        limit = self.settings.max_prompt_tokens
        if not limit:
            return False
        prompt = templates.with_examples(self.task, instruction, demos) if demos else instruction
        return text_tokens(prompt) > limit

    def add(
        self, prompt: str, stage: str, parents: list[Candidate], note: str | None = None,
        demos: list[Example] | None = None,
    ) -> Candidate:
        """Records a candidate and queues it for scoring (``send_to_scoring``, ``admit`` and
        ``end_stage`` send the queue); a prompt seen before in the run is a duplicate and is
        not scored again. With ``demos`` the candidate is the instruction ``prompt`` followed
        by these solved examples."""
        instruction = None
        if demos:
            instruction, prompt = prompt, templates.with_examples(self.task, prompt, demos)
        candidate = self._parts.history.record(
            prompt, stage, self.number, parents, note, instruction, [example.index for example in demos or []]
        )
        self.new.append(candidate)
        if candidate.duplicate_of is None:
            self._queued.append(candidate)
        return candidate

    def send_to_scoring(self) -> None:
        """Starts scoring the queued candidates on the train sample (in one batch)."""
        queued, self._queued = self._queued, []
        self._parts.scoring.start_train_scoring(queued, self.best, self._state.best_record)

    def reject(self, stage: str, reason: str) -> None:
        """Counts a dropped reply or candidate (reported per stage and reason)."""
        self._parts.history.reject(stage, reason)

    def original(self, candidate: Candidate) -> Candidate:
        """The first candidate with this prompt (itself unless it is a duplicate)."""
        return self._parts.history.original(candidate)

    def draw_examples(self, wanted: int) -> list[Example]:
        """``wanted`` random train examples (all of them if fewer), in sample order."""
        return random_examples(self.task.train, self.rng, wanted)

    def draw_demos(self, wanted: int) -> list[Example]:
        """``wanted`` solved examples for a prompt, stratified by label (``examples.stratified_demos``)."""
        return stratified_demos(self.task, self.rng, wanted)

    def demos_of(self, candidate: Candidate) -> list[Example]:
        """The solved examples a candidate's prompt carries (none for a bare instruction)."""
        return carried_demos(self.task, candidate)

    def mistakes(self, candidate: Candidate, wanted: int) -> Mistakes:
        """Train examples for a distillation that studies what went wrong
        (``examples.mistakes_in``), only from scores paid for already: the examples the
        candidate was scored on (its race's blocks, or the whole sample): a candidate of this
        round, or the best prompt (from its saved train record: classification only). Call
        after ``scored()``; none for another candidate, so that a resumed round, which holds
        only what the run state saved, draws as the first run did."""
        original = self.original(candidate)
        scoring = self._parts.scoring
        answered = []
        if original.round == self.number:
            answered = scoring.train_answers(original.prompt)
        elif original.id == self._state.best_id and self._state.best_record and self.task.is_classification:
            answered = recorded_answers(self.task, self._state.best_record, scoring.refused.rows(TRAIN_SCORING))
        return mistakes_in(answered, self.rng, wanted, self.task.is_classification)

    async def end_stage(self, stage: str, candidates: list[Candidate | None]) -> bool:
        """Ends a stage: scoring of its candidates starts, callbacks hear ``on_stage``, and the
        budgets are checked. True means a budget ran out: the method should return."""
        self.send_to_scoring()
        kept = [candidate for candidate in candidates if candidate is not None]
        self._parts.events.emit("on_stage", StageEvent(self.number, stage, kept, self.rejections.get(stage, {})))
        self.stop_reason = await self._parts.budgets.reached()
        return self.stop_reason is not None

    # ----- scores --------------------------------------------------------------------------

    async def scored(self) -> None:
        """Waits until every candidate sent to scoring has its train score."""
        await self._parts.scoring.wait()

    async def evaluate(self, prompts: list[str], examples: list[Example], stage: str = TRAIN_SCORING) -> list[Score]:
        """Scores prompts on any examples through the run's evaluator (counted under ``stage``),
        with per-example outputs; for a method that needs scores of its own making."""
        return await self._parts.scoring.evaluate(prompts, examples, stage)

    def observed(self, prompt: str, examples: list[Example]) -> list[dict[str, str]] | None:
        """What the app answered with ``prompt`` on each example, its score and the judges'
        notes, when the task shows outputs (the MLflow path) and ``prompt`` was scored."""
        return self._parts.scoring.observed(prompt, examples)

    async def score_validation(self, candidates: list[Candidate]) -> None:
        await self._parts.scoring.score_validation(candidates)

    def scoring_left(self) -> int | None:
        """Scoring requests left under ``max_scoring_calls`` (None when there is no such
        budget). Counts finished scoring only: call after ``scored()`` to be exact."""
        return self._parts.budgets.scoring_left()

    def candidate_cost(self, candidates: int) -> int:
        """Scoring requests that ``candidates`` new distinct candidates may cost at most: the
        train sample each, and the validation sample for those the selection will validate."""
        return self._parts.scoring.candidate_cost(candidates)
