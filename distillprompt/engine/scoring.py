"""How a run pays for scores: candidates on the train sample (in full, or raced against the
best prompt so far), the round's top ones on the validation sample, the initial and final
prompts on the test sample, all through the run's ``Evaluator``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..data import Example, Task
from ..diagnosis import answer_counts
from ..evaluation import Evaluator, Score
from ..paired import record_of
from ..llm import UsageMeter
from ..settings import OptimizerSettings
from ..state import Candidate, dedup_key
from .events import TEST_SCORING, TRAIN_SCORING, VAL_SCORING
from .racing import Race, RaceSummary, race_order

log = logging.getLogger(__name__)


class RefusedExamples:
    """The examples whose scoring request the endpoint refused (longer than the model's
    context, stopped by a content filter): by sample and row (``Example.index``, its position
    in its split), how many prompts' requests for it were refused and why. Each such request
    scored as an unparsed answer; the record says which examples the scores lost."""

    def __init__(self) -> None:
        self._by_example: dict[tuple[str, int], dict[str, Any]] = {}

    def load(self, saved: list[dict[str, Any]]) -> None:
        """Goes on from a saved record (a resumed run's state)."""
        for entry in saved:
            key = (entry["sample"], entry["example"])
            self._by_example[key] = {**entry, "reasons": dict(entry["reasons"])}

    def add(self, sample: str, examples: list[Example], score: Score) -> int:
        """Records a score's refused requests (``examples`` in the score's order); their count."""
        count = 0
        for example, reason in zip(examples, score.refused):
            if not reason:
                continue
            count += 1
            entry = self._by_example.setdefault(
                (sample, example.index), {"sample": sample, "example": example.index, "requests": 0, "reasons": {}})
            entry["requests"] += 1
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
        return count

    def rows(self, sample: str) -> set[int]:
        """The rows of a sample ("train", ...) that some request for was refused."""
        return {row for kind, row in self._by_example if kind == sample}

    def to_list(self) -> list[dict[str, Any]]:
        """By sample (train, validation, test) and row."""
        order = {TRAIN_SCORING: 0, VAL_SCORING: 1, TEST_SCORING: 2}
        keys = sorted(self._by_example, key=lambda key: (order.get(key[0], 3), key))
        return [{**self._by_example[key], "reasons": dict(self._by_example[key]["reasons"])} for key in keys]


class Scoring:
    """The run's scoring. Train scoring of a batch of candidates starts at once and runs in
    the background (``start_train_scoring``), beside the meta-prompts the round writes meanwhile;
    ``wait`` is where the round waits for it."""

    def __init__(
        self, task: Task, evaluator: Evaluator, settings: OptimizerSettings, *, seed: int, meter: UsageMeter,
        racing: bool, validation_top: int | None,
    ) -> None:
        self.task = task
        self.evaluator = evaluator
        self.settings = settings
        self.meter = meter
        self.racing = racing and len(task.train) > settings.race_block
        self.validation_top = validation_top  # how many a round validates at most (None: no validation)
        self._pending: list[asyncio.Task[Any]] = []
        # prompt -> its train Score and the train positions it covers (race order when a race
        # stopped it): what it answered, for the distill stage
        self._train_scores: dict[str, tuple[Score, list[int]]] = {}
        # prompt -> train record (train order, ``paired.record_of``) of every prompt scored on
        # the whole sample: the incumbent's side of a race, never paid for twice
        self._records: dict[str, list[float]] = {}
        self._labels = task.labels if task.is_classification else None
        self._race_order = race_order(len(task.train), seed)
        self.refused = RefusedExamples()

    # ----- train ---------------------------------------------------------------------------

    def start_train_scoring(self, candidates: list[Candidate], incumbent: Candidate,
                            incumbent_record: list[float] | None) -> None:
        """Starts scoring ``candidates`` on the train sample: raced against ``incumbent``
        (``incumbent_record``: its train record, if the run state kept it) or in full."""
        if candidates:
            scoring = (self._race(candidates, incumbent, incumbent_record) if self.racing
                       else self.score_train(candidates))
            self._pending.append(asyncio.ensure_future(scoring))

    async def score_train(self, candidates: list[Candidate]) -> None:
        """Scores candidates on every train example."""
        scores = await self.evaluator.score([c.prompt for c in candidates], self.task.train, stage=TRAIN_SCORING)
        everywhere = list(range(len(self.task.train)))
        for candidate, score in zip(candidates, scores):
            self._take(candidate, score, everywhere)

    def record(self, prompt: str) -> list[float] | None:
        """A prompt's train record (``paired.record_of``), if it was scored on the whole sample."""
        return self._records.get(dedup_key(prompt))

    async def _race(
        self, candidates: list[Candidate], incumbent: Candidate, incumbent_record: list[float] | None
    ) -> None:
        """Scores new candidates block by block against the best prompt so far (``racing.py``)."""
        record = self.record(incumbent.prompt) or incumbent_record
        if record is None or len(record) != len(self.task.train):
            # a state saved before its best prompt's train record was kept: the record is
            # scored once more (the response cache answers it)
            log.info("scoring the best prompt once more for its train record")
            await self.score_train([Candidate(id=incumbent.id, prompt=incumbent.prompt, stage=incumbent.stage,
                                            round=incumbent.round)])
            record = self._records[dedup_key(incumbent.prompt)]
        settings = self.settings
        race = Race(self.evaluator, self.task, self._race_order, settings.race_block, settings.race_alpha, record,
                    TRAIN_SCORING)
        outcomes = await race.run([c.prompt for c in candidates])
        for candidate, outcome in zip(candidates, outcomes):
            self._take(candidate, outcome.score, outcome.positions)
            if outcome.stopped:
                candidate.eliminated_by = incumbent.id if outcome.by is None else candidates[outcome.by].id

    def _take(self, candidate: Candidate, score: Score, positions: list[int]) -> None:
        """Records a candidate's train score, which covers the train ``positions``."""
        key = dedup_key(candidate.prompt)
        self._train_scores[key] = (score, positions)
        if len(positions) == len(self.task.train):
            self._records[key] = record_of(score, self._labels)
        candidate.refused = self.refused.add(TRAIN_SCORING, [self.task.train[p] for p in positions], score)
        candidate.score = score.value
        candidate.metrics = dict(score.metrics)
        candidate.parse_rate = score.parse_rate
        candidate.examples_scored = len(positions)
        if self.task.is_classification:
            candidate.answers = answer_counts(score.predictions)

    async def wait(self) -> None:
        """Waits until every scoring started so far is done; the first failure is raised, and
        the scoring started stays pending for ``wait_ignoring_failures`` or ``cancel``."""
        pending, self._pending = self._pending, []
        if pending:
            try:
                await asyncio.gather(*pending)
            except BaseException:
                self._pending = pending + self._pending
                raise

    async def wait_ignoring_failures(self) -> None:
        """Lets every scoring started end, failed or not: once ``--max-cost`` is spent each new
        request is refused at once, and the replies already on their way, which are paid for,
        reach the response cache (a batch that finished keeps its scores)."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending, return_exceptions=True)

    async def cancel(self) -> None:
        pending, self._pending = self._pending, []
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def train_answers(self, prompt: str) -> list[tuple[Example, float, dict[str, str]]]:
        """Every train example ``prompt`` was scored on and answered (train order; not those
        the endpoint refused: they say nothing of the prompt), with its per-example score and
        what the target answered: the label it gave (classification), else the answer and its
        score, and the judges' notes where there are some."""
        found = self._train_scores.get(dedup_key(prompt))
        if found is None:
            return []
        score, positions = found
        entries = []
        for i, position in sorted(enumerate(positions), key=lambda pair: pair[1]):
            if i < len(score.refused) and score.refused[i]:
                continue
            entries.append((self.task.train[position], score.per_example[i], self._shown(score, i)))
        return entries

    def _shown(self, score: Score, i: int) -> dict[str, str]:
        if self.task.is_classification and not self.task.shows_outputs:
            label = score.predictions[i]
            return {"output": label if label is not None else f"no label ({_clip(score.outputs[i], 200)})"}
        note = score.notes[i] if i < len(score.notes) else ""
        return {"output": _clip(score.outputs[i]), "score": f"{score.per_example[i]:.2f}", "notes": _clip(note)}

    def observed(self, prompt: str, examples: list[Example]) -> list[dict[str, str]] | None:
        """What the app answered with ``prompt`` on each example, its score and the judges'
        notes, when the task shows outputs and the prompt's train scoring recorded them (an
        empty record for an example a race stopped the prompt before)."""
        found = self._train_scores.get(dedup_key(prompt)) if self.task.shows_outputs else None
        if found is None:
            return None
        score, positions = found
        train_position = {example.index: i for i, example in enumerate(self.task.train)}
        where = {position: i for i, position in enumerate(positions)}
        observed: list[dict[str, str]] = []
        for example in examples:
            i = where.get(train_position[example.index])
            if i is None:
                observed.append({})
                continue
            observed.append(self._shown(score, i))
        return observed if any(observed) else None

    # ----- validation and test ---------------------------------------------------------------

    async def score_validation(self, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        scores = await self.evaluator.score([c.prompt for c in candidates], self.task.val, stage=VAL_SCORING)
        for candidate, score in zip(candidates, scores):
            candidate.val_score = score.value
            self.refused.add(VAL_SCORING, self.task.val, score)

    async def score_test(self, prompt: str) -> Score | None:
        if not self.task.test:
            return None  # a task without a test sample (an app's train data only): no verdict
        (score,) = await self.evaluator.score([prompt], self.task.test, stage=TEST_SCORING)
        self.refused.add(TEST_SCORING, self.task.test, score)
        return score

    async def evaluate(self, prompts: list[str], examples: list[Example], stage: str) -> list[Score]:
        """Scores prompts on any examples (counted under ``stage``), with per-example outputs."""
        scores = await self.evaluator.score(prompts, examples, stage=stage)
        for score in scores:
            self.refused.add(stage, examples, score)
        return scores

    # ----- what it costs ---------------------------------------------------------------------

    def candidate_cost(self, candidates: int) -> int:
        """Scoring requests that ``candidates`` new distinct candidates may cost at most: the
        train sample each, and the validation sample for those the selection validates."""
        cost = candidates * len(self.task.train)
        if self.validation_top is not None:
            cost += min(candidates, self.validation_top) * len(self.task.val)
        return cost

    def spent(self) -> int:
        """Scoring requests (train and validation) of the search so far, served by the cache or not."""
        by_stage = self.meter.snapshot()
        return sum(by_stage[stage].calls for stage in (TRAIN_SCORING, VAL_SCORING) if stage in by_stage)

    def race_summary(self, new: list[Candidate]) -> RaceSummary:
        """What the train scoring of these (new) candidates cost, against the whole sample each."""
        scored = [c for c in new if c.duplicate_of is None and c.examples_scored is not None]
        stopped = [c for c in scored if c.eliminated_by is not None]
        return RaceSummary(
            candidates=len(scored),
            stopped=len(stopped),
            stopped_after=[c.examples_scored or 0 for c in stopped],
            requests=sum(c.examples_scored or 0 for c in scored),
            full_requests=len(scored) * len(self.task.train),
        )

    def race_record(self, history: list[Candidate]) -> dict[str, Any]:
        """How the run's train scores were paid for, over every round (resumed ones too)."""
        settings = self.settings
        summary = self.race_summary([c for c in history if c.round > 0])
        how = (
            {"scoring": "race", "block": settings.race_block, "alpha": settings.race_alpha}
            if self.racing else {"scoring": "full"}
        )
        return {**how, **summary.to_dict()}


def _clip(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
