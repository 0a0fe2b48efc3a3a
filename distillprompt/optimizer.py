"""The loop every method runs in, and its public protocol.

Each round the ``Method`` (DistillPrompt by default, ``methods.py``) proposes candidates
through a ``Round``; every new distinct one is scored on the train sample, the method's
``Selection`` picks the best, and the ``StopRule``s and budgets decide whether another round
runs. The loop knows nothing of where scoring runs or where results are recorded: it talks
to an ``LLM`` for meta-prompts, an ``Evaluator`` for scores and ``Callback``s for
everything else.

Scoring of a stage's candidates starts as soon as the stage's replies are in, while the
next stage's meta-prompts are written; meta-prompts overtake queued scoring requests in the
shared request limiter, so the chain the round must wait for is never stuck behind scoring.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import templates
from .candidates import Extraction, extract_candidate
from .data import Example, Task
from .evaluation import Evaluator, Score
from .errors import EndpointUnavailable, UserError
from .llm import LLM, META, LLMCall, Usage, UsageMeter
from .racing import Race, RaceSummary, race_order, start_warm_up
from .settings import OptimizerSettings
from .state import Candidate, RunState, dedup_key
from .verdict import Verdict, judge
from .diagnosis import RoundDiagnosis, answer_counts, diagnose

log = logging.getLogger(__name__)

TRAIN_SCORING = "scoring"
VAL_SCORING = "validation"
ENDPOINT_UNAVAILABLE = "endpoint_unavailable"
FLAT_SIGNAL = "flat_signal"  # two rounds in a row showed no signal
TEST_SCORING = "test"
META_CHARS_PER_TOKEN = 3  # the default length bound: a reply that long ran into --meta-max-tokens


@dataclass
class StageEvent:
    epoch: int
    stage: str
    candidates: list[Candidate]
    rejected: dict[str, int]


@dataclass
class RoundResult:
    epoch: int
    candidates: list[Candidate]
    best: Candidate
    improved: bool
    stage_stats: dict[str, dict[str, float]]
    usage: Usage
    usage_by_stage: dict[str, Usage]
    rejections: dict[str, dict[str, int]]
    wall_time: float
    state: RunState
    stop_reason: str | None = None
    diagnosis: RoundDiagnosis | None = None
    # requests in flight over the round: the bound at its end ("limit"), "peak" and time-"mean"
    concurrency: dict[str, float] = field(default_factory=dict)
    race: RaceSummary = field(default_factory=RaceSummary)  # what the round's train scoring cost


@dataclass
class RunResult:
    task: dict[str, Any]
    initial: Candidate
    final: Candidate
    initial_scores: dict[str, dict[str, float]]
    final_scores: dict[str, dict[str, float]]
    initial_test: Score | None  # None when the endpoint gave up before the test scoring
    final_test: Score | None
    history: list[Candidate]
    rounds: list[dict[str, Any]]
    usage: Usage
    usage_by_stage: dict[str, Usage]
    rejections: dict[str, dict[str, int]]
    wall_time: float
    stop_reason: str
    failure: str | None = None  # what made the endpoint give up, when it did
    verdict: Verdict | None = None  # did the final prompt beat the initial one on test
    diagnosis: str | None = None  # why the run could not improve, when a round showed no signal
    race: dict[str, Any] = field(default_factory=dict)  # how train scores were paid for, over all rounds
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_prompt(self) -> str:
        return self.initial.prompt

    @property
    def final_prompt(self) -> str:
        return self.final.prompt

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_prompt": self.initial.prompt,
            "final_prompt": self.final.prompt,
            "initial_scores": self.initial_scores,
            "final_scores": self.final_scores,
            "history": [candidate.to_dict() for candidate in self.history],
            "usage": {
                "total": self.usage.to_dict(),
                "by_stage": {stage: usage.to_dict() for stage, usage in self.usage_by_stage.items()},
            },
            "rounds": self.rounds,
            "rejections": self.rejections,
            "task": self.task,
            "final_candidate": self.final.id,
            "wall_time_seconds": round(self.wall_time, 3),
            "stop_reason": self.stop_reason,
            "test_outputs": {
                "initial": _outputs_record(self.initial_test),
                "final": _outputs_record(self.final_test),
            },
            "failure": self.failure,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "diagnosis": self.diagnosis,
            "race": self.race,
            **self.extra,
        }


def _outputs_record(score: Score | None) -> list[dict[str, Any]]:
    if score is None:
        return []
    return [
        {"output": output, "prediction": prediction, "target": target, "score": value}
        for output, prediction, target, value in zip(score.outputs, score.predictions, score.targets, score.per_example)
    ]


class Callback:
    """Receives the loop's events; subclass it and override what you need (every method is a
    no-op here). A callback that raises is logged with its name and the event, and the run
    goes on; only a ``UserError`` (a deliberate stop with its fix) ends the run."""

    def on_settings(self, settings: Any) -> None:
        """The settings the run actually uses (demo defaults and the embedded endpoint applied)."""

    def on_start(self, task: Task, initial: Candidate) -> None:
        """The task is loaded and the initial prompt is about to be scored."""

    def on_stage(self, event: StageEvent) -> None:
        """A stage of a round has its candidates (sent to scoring) and its drop counts."""

    def on_round(self, result: RoundResult) -> None:
        """A round is scored, selected and diagnosed."""

    def on_rounds_done(self, state: RunState) -> None:
        """The last round is over: only the test-sample scoring is left."""

    def on_finish(self, result: RunResult) -> None:
        """The run's result, test scores and verdict included."""

    def on_end(self, succeeded: bool) -> None:
        """The run is over, finished or failed (called by the runner, also on errors)."""

    def on_llm_call(self, call: LLMCall) -> None:
        """One answered LLM request (meta-prompt or scoring), e.g. for per-request tracing.
        The runner subscribes only callbacks that override this."""

    @classmethod
    def wants_llm_calls(cls) -> bool:
        return cls.on_llm_call is not Callback.on_llm_call


def notify(callback: Callback, event: str, *args: Any) -> None:
    """Calls one callback; one that fails is logged and the run goes on (a broken dashboard
    must not cost the requests a run has paid for)."""
    try:
        getattr(callback, event)(*args)
    except UserError:
        raise  # a callback's deliberate stop, with the fix in its message
    except Exception as error:  # noqa: BLE001 - any other failure of a callback is the callback's
        log.warning("callback %s failed in %s (%s: %s); the run goes on",
                    type(callback).__name__, event, type(error).__name__, str(error)[:200])


# ----- the public method protocol -------------------------------------------------------------


class Selection:
    """Picks the best prompt once a round's candidates are scored."""

    uses_validation = False  # whether the loop scores the initial prompt on the validation sample
    # whether a candidate that is clearly worse than the best prompt can never be chosen, so
    # that ``--scoring race`` may stop scoring it early (a selection that keeps whatever the
    # method built, such as ``LatestCandidate``, needs every score in full)
    races = False

    async def choose(self, round: Round, new: list[Candidate]) -> Candidate:
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

    def __init__(self, top: int = 3) -> None:
        self.top = top

    async def choose(self, round: Round, new: list[Candidate]) -> Candidate:
        best = round.best
        if not round.validating:
            for candidate in new:
                if candidate.selectable and (candidate.score or 0.0) > (best.score or 0.0):
                    best = candidate
            return best
        distinct = [c for c in new if c.duplicate_of is None and c.selectable]
        # highest train score first; at equal score the older candidate
        top = sorted(distinct, key=lambda c: (-(c.score or 0.0), c.id))[: self.top]
        await round.score_validation([c for c in top if c.val_score is None])
        for candidate in sorted(top, key=lambda c: c.id):
            if candidate.val_score is not None and candidate.val_score > (best.val_score or 0.0):
                best = candidate
        return best


class LatestCandidate(Selection):
    """The round's last candidate, whatever its score (a method that builds its result rather
    than searching for it, such as ``fewshot``)."""

    async def choose(self, round: Round, new: list[Candidate]) -> Candidate:
        # a result equal to a prompt seen before is that prompt (the initial one: nothing changed)
        return round.original(new[-1]) if new else round.best


class StopRule:
    """Ends the run after a round; ``check`` returns a stop reason or None."""

    def check(self, state: RunState, result: RoundResult) -> str | None:
        raise NotImplementedError


class Patience(StopRule):
    """Stops after ``rounds`` rounds in a row that did not change the best prompt (0: never)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def check(self, state: RunState, result: RoundResult) -> str | None:
        return "patience" if self.rounds and state.stale_epochs >= self.rounds else None


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
    ``round.extras`` (saved with the run state). Hand an instance to ``Optimizer(method=...)``;
    the built-in ones are listed in ``methods.METHODS`` (``--method``)."""

    name = ""

    def rounds(self, settings: OptimizerSettings) -> int:
        """How many rounds the method runs at most (0: the initial prompt is the result)."""
        return settings.epochs

    def patience(self, settings: OptimizerSettings) -> int:
        return settings.patience

    def selection(self, settings: OptimizerSettings) -> Selection:
        return HighestScore(settings.val_top)

    async def propose(self, round: Round) -> None:
        """Adds the round's candidates (``round.ask``, ``round.admit``, ``round.add``) and
        closes each stage with ``round.end_stage``; returns early when that says stop."""
        raise NotImplementedError

    def accepted(self, round: Round, candidate: Candidate) -> None:
        """The selection made ``candidate`` the best prompt (called only when the best changed)."""


class Round:
    """What a method may use during one round: the public side of the loop."""

    def __init__(self, loop: Optimizer, epoch: int, rng: Any, rejections_before: dict[str, dict[str, int]]) -> None:
        self._loop = loop
        self.epoch = epoch
        self.rng = rng  # the run's random state; saved after the round, so a resumed run draws the same
        self.new: list[Candidate] = []  # the round's candidates, duplicates included, in creation order
        self.stop_reason: str | None = None  # set when a budget ran out at the end of a stage
        self._rejections_before = rejections_before
        self._queued: list[Candidate] = []

    @property
    def task(self) -> Task:
        return self._loop.task

    @property
    def settings(self) -> OptimizerSettings:
        return self._loop.settings

    @property
    def best(self) -> Candidate:
        return self._loop.state.best

    @property
    def initial(self) -> Candidate:
        return self._loop.state.history[0]

    @property
    def history(self) -> list[Candidate]:
        return self._loop.state.history

    @property
    def extras(self) -> dict[str, Any]:
        """The method's own state, kept between rounds and saved with the run state."""
        return self._loop.state.extras

    @property
    def validating(self) -> bool:
        return self._loop.validating

    @property
    def seed(self) -> int:
        return self._loop.seed

    @property
    def optimizer_model(self) -> str:
        """The optimizer model's name at its endpoint."""
        return str(getattr(self._loop.llm, "model", ""))

    async def ask(
        self, meta: templates.MetaPrompt, temperature: float, n: int, key: str, parents: list[Candidate]
    ) -> list[Extraction]:
        """``n`` replies of the optimizer model, each cleaned into a candidate prompt or a reason
        to drop it. ``key`` tells this request apart from others of the round in the response
        cache (the same key on a rerun gets the same reply). A reply that repeats a parent is
        asked again at the copy-retry temperature (``copy_retries`` times at most, each a
        request of its own, counted as ``<stage>_copy_retry``); a retry that is unusable keeps
        the copy."""
        loop = self._loop
        sample = f"{self.epoch}:{key}"
        extractions = [loop._extract(reply, meta) for reply in await loop._ask(meta, temperature, n, sample)]
        parent_keys = {dedup_key(parent.prompt) for parent in parents}
        for attempt in range(self.settings.copy_retries):
            copies = [
                i for i, extraction in enumerate(extractions)
                if extraction.prompt is not None and dedup_key(extraction.prompt) in parent_keys
            ]
            if not copies:
                break
            retried = await asyncio.gather(*(
                loop._ask(meta, self.settings.copy_retry_temperature, 1, f"{sample}:copy{i}:{attempt}",
                          stage=f"{meta.stage}_copy_retry")
                for i in copies
            ))
            for i, again in zip(copies, retried):
                extraction = loop._extract(again[0] if again else "", meta)
                if extraction.prompt is not None:
                    extractions[i] = extraction
        return extractions

    async def ask_text(self, meta: templates.MetaPrompt, temperature: float, key: str) -> str:
        """One raw reply of the optimizer model (no cleaning), e.g. a rewritten phrase."""
        replies = await self._loop._ask(meta, temperature, 1, f"{self.epoch}:{key}")
        return replies[0] if replies else ""

    async def chat(self, messages: list[dict[str, Any]], temperature: float, key: str, stage: str) -> str:
        """One raw reply of the optimizer model to any messages (an outside optimizer's own
        meta-prompts), through the run's cache, retries, limiter and usage meter."""
        replies = await self._loop.llm.complete(
            messages, temperature=temperature, n=1, max_tokens=self._loop.meta_max_tokens, stage=stage,
            sample=f"{self.epoch}:{key}", priority=META,
        )
        return replies[0] if replies else ""

    async def evaluate(self, prompts: list[str], examples: list[Example], stage: str = TRAIN_SCORING) -> list[Score]:
        """Scores prompts on any examples through the run's evaluator (counted under ``stage``),
        with per-example outputs; for a method that needs scores of its own making."""
        return await self._loop.evaluator.score(prompts, examples, stage=stage)

    def admit(self, extractions: list[Extraction], stage: str, parents: list[Candidate]) -> list[Candidate | None]:
        """Cleaned replies become candidates, sent to scoring at once (None where a reply is
        dropped, counted by reason; a template's candidate that drops or invents a variable is
        dropped too)."""
        admitted: list[Candidate | None] = []
        for extraction in extractions:
            reason = extraction.reason if extraction.prompt is None else self._loop._variables_problem(extraction.prompt)
            if extraction.prompt is None or reason is not None:
                self.reject(stage, reason or "unusable")
                admitted.append(None)
                continue
            admitted.append(self.add(extraction.prompt, stage, parents))
        self.send_to_scoring()
        return admitted

    def add(self, prompt: str, stage: str, parents: list[Candidate], note: str | None = None) -> Candidate:
        """Records a candidate and queues it for scoring (``send_to_scoring``, ``admit`` and
        ``end_stage`` send the queue); a prompt seen before in the run is a duplicate and is
        not scored again."""
        candidate = self._loop._record(prompt, stage, self.epoch, parents, note)
        self.new.append(candidate)
        if candidate.duplicate_of is None:
            self._queued.append(candidate)
        return candidate

    def send_to_scoring(self) -> None:
        """Starts scoring the queued candidates on the train sample (in one batch)."""
        queued, self._queued = self._queued, []
        self._loop._score_soon(queued)

    def reject(self, stage: str, reason: str) -> None:
        """Counts a dropped reply or candidate (reported per stage and reason)."""
        self._loop.state.reject(stage, reason)

    async def end_stage(self, stage: str, candidates: list[Candidate | None]) -> bool:
        """Ends a stage: scoring of its candidates starts, callbacks hear ``on_stage``, and the
        budgets are checked. True means a budget ran out: the method should return."""
        self.send_to_scoring()
        rejected = _rejections_since(self._loop.state.rejections, self._rejections_before).get(stage, {})
        kept = [candidate for candidate in candidates if candidate is not None]
        self._loop._emit("on_stage", StageEvent(self.epoch, stage, kept, rejected))
        self.stop_reason = await self._loop._budget_reached()
        return self.stop_reason is not None

    def scoring_left(self) -> int | None:
        """Scoring requests left under ``max_scoring_calls`` (None when there is no such
        budget). Counts finished scoring only: call after ``scored()`` to be exact."""
        budget = self.settings.max_scoring_calls
        return max(0, budget - self._loop._scoring_spent()) if budget else None

    def candidate_cost(self, candidates: int) -> int:
        """Scoring requests that ``candidates`` new distinct candidates cost: the train sample
        each, and the validation sample for those the selection will validate."""
        return self._loop._candidate_cost(candidates)

    def draw_examples(self, wanted: int) -> list[Example]:
        """``wanted`` random train examples (all of them if fewer), in sample order."""
        train = self.task.train
        count = min(wanted, len(train))
        return [train[i] for i in sorted(self.rng.sample(range(len(train)), count))]

    async def scored(self) -> None:
        """Waits until every candidate sent to scoring has its train score."""
        await self._loop._wait_pending()

    def observed(self, prompt: str, examples: list[Example]) -> list[dict[str, str]] | None:
        """What the app answered with ``prompt`` on each example, its score and the judges'
        notes, when the task shows outputs (the MLflow path) and ``prompt`` was scored."""
        return self._loop._observed(prompt, examples)

    def original(self, candidate: Candidate) -> Candidate:
        """The first candidate with this prompt (itself unless it is a duplicate)."""
        return candidate if candidate.duplicate_of is None else self.history[candidate.duplicate_of]

    async def score_validation(self, candidates: list[Candidate]) -> None:
        await self._loop._score_val(candidates)


class Optimizer:
    """The loop: every method runs in it (``optimize``, ``compare`` and the MLflow optimizer
    build it through ``runner.make_optimizer``). It scores the initial prompt, runs rounds of
    the ``Method`` (DistillPrompt unless another is given), selects with the method's
    ``Selection``, stops on a ``StopRule`` (the method's patience, no signal twice in a row)
    or a budget, scores the initial and final prompts on the test sample and judges the
    difference. Scoring goes through the ``Evaluator`` (a thread pool, Ray actors, or MLflow's
    ``eval_fn``); callbacks hear every event."""

    def __init__(
        self,
        task: Task,
        llm: LLM,
        evaluator: Evaluator,
        settings: OptimizerSettings,
        *,
        seed: int,
        meter: UsageMeter,
        callbacks: list[Callback] | None = None,
        meta_max_tokens: int = 1024,
        state: RunState | None = None,
        method: Method | None = None,
        stop_rules: list[StopRule] | None = None,
    ) -> None:
        if method is None:
            from .methods import DistillPrompt

            method = DistillPrompt()
        self.task = task
        self.llm = llm
        self.evaluator = evaluator
        self.settings = settings
        self.seed = seed
        self.meter = meter
        self.callbacks = callbacks or []
        self.meta_max_tokens = meta_max_tokens
        self.state = state or RunState(seed=seed)
        self.method = method
        self.selection = method.selection(settings)
        self.stop_rules = stop_rules if stop_rules is not None else [
            Patience(method.patience(settings)),
            *([FlatSignal(2)] if settings.stop_when_flat else []),
        ]
        self._by_text: dict[str, Candidate] = {}
        self._pending: list[asyncio.Task[None]] = []
        # prompt -> its train Score and the train positions it covers, for tasks that show outputs
        self._train_scores: dict[str, tuple[Score, list[int]]] = {}
        # prompt -> per-example train scores (train order) of every prompt scored on the whole
        # sample: the incumbent's side of a race, never paid for twice
        self._per_example: dict[str, list[float]] = {}
        self._race_order = race_order(len(task.train), seed)

    # ----- public ------------------------------------------------------------------------

    async def run(self, initial_prompt: str | None = None) -> RunResult:
        started = time.perf_counter()
        prompt = (initial_prompt or "").strip() or templates.default_initial_prompt(self.task)
        state = self.state
        if not state.history:
            state.history.append(Candidate(id=0, prompt=prompt, stage="initial", epoch=0))
        self._use_state(state)
        initial = state.history[0]
        self._emit("on_start", self.task, initial)

        if self.racing:
            start_warm_up()
        initial_test = asyncio.create_task(self._score_test(initial.prompt))
        self.failure: str | None = None
        try:
            if initial.score is None:
                await self._score_now([initial])
            if state.best_per_example is None:
                state.best_per_example = self._per_example.get(dedup_key(state.best.prompt))
            if self.validating and initial.val_score is None:
                await self._score_val([initial])
            rounds: list[dict[str, Any]] = []
            stop_reason = state.stop_reason
            while stop_reason is None and state.epoch < self.rounds:
                checkpoint = copy.deepcopy(state)
                try:
                    result = await self._round(state.epoch + 1)
                except EndpointUnavailable as error:
                    # The endpoint gave up beyond every retry: forget the unfinished round and
                    # stop with the best prompt of the finished ones.
                    await self._cancel_pending()
                    state = self._use_state(checkpoint)
                    self.failure = str(error)
                    stop_reason = ENDPOINT_UNAVAILABLE
                    break
                rounds.append(_round_summary(result))
                stop_reason = result.stop_reason
            stop_reason = stop_reason or "epochs"
            state.stop_reason = stop_reason
            self._emit("on_rounds_done", state)
            final = state.best
            initial_test_score = await self._unless_unavailable(initial_test)
            if final.id == initial.id:
                final_test_score = initial_test_score
            else:
                final_test_score = await self._unless_unavailable(self._score_test(final.prompt))
        finally:
            if not initial_test.done():
                initial_test.cancel()
            await self._cancel_pending()

        usage_by_stage = self.meter.snapshot()
        result = RunResult(
            task=self.task.describe(),
            initial=initial,
            final=final,
            initial_scores=self._scores(initial, initial_test_score),
            final_scores=self._scores(final, final_test_score),
            initial_test=initial_test_score,
            final_test=final_test_score,
            history=list(state.history),
            rounds=rounds,
            usage=self.meter.total(),
            usage_by_stage=usage_by_stage,
            rejections=state.rejections,
            wall_time=time.perf_counter() - started,
            stop_reason=stop_reason,
            failure=self.failure,
            race=self._race_record(state.history),
            diagnosis=next(
                (r["diagnosis"]["sentence"] for r in reversed(rounds) if (r.get("diagnosis") or {}).get("flat")), None
            ),
            verdict=judge(
                metric=self.task.metric,
                classification=self.task.is_classification,
                kept_initial=final.id == initial.id and self.searches,
                initial_test=initial_test_score,
                final_test=final_test_score,
                seed=self.seed,
            ),
        )
        self._emit("on_finish", result)
        return result

    # ----- one round ---------------------------------------------------------------------

    @property
    def rounds(self) -> int:
        return self.method.rounds(self.settings)

    @property
    def searches(self) -> bool:
        """Whether the method looks for a better prompt (``initial`` does not)."""
        return self.rounds > 0

    @property
    def validating(self) -> bool:
        return bool(self.task.val) and self.selection.uses_validation

    @property
    def racing(self) -> bool:
        """Whether new candidates race (``--scoring race``, a selection that allows it, and a
        train sample of more than one block)."""
        settings = self.settings
        return settings.scoring == "race" and self.selection.races and len(self.task.train) > settings.race_block

    @property
    def max_prompt_length(self) -> int:
        """Characters beyond which a candidate is dropped: set, or sized from the reply budget."""
        return self.settings.max_prompt_length or META_CHARS_PER_TOKEN * self.meta_max_tokens

    async def _round(self, epoch: int) -> RoundResult:
        """One round: the method proposes candidates (sent to scoring as they come), then the
        best is selected, the round is diagnosed and the stop rules are asked."""
        state = self.state
        started = time.perf_counter()
        usage_before = self.meter.snapshot()
        limiter = getattr(self.llm, "limiter", None)  # the run's bound, when the LLM client has one
        if limiter is not None:
            limiter.window()
        rejections_before = {stage: dict(reasons) for stage, reasons in state.rejections.items()}
        rng = state.rng()
        handle = Round(self, epoch, rng, rejections_before)
        await self.method.propose(handle)
        handle.send_to_scoring()
        stop_reason = handle.stop_reason
        new = handle.new

        await self._wait_pending()
        for candidate in new:
            if candidate.duplicate_of is not None:
                _copy_score(candidate, state.history[candidate.duplicate_of])
        chosen = await self.selection.choose(handle, new)
        improved = chosen.id != state.best_id
        state.best_id = chosen.id
        state.best_per_example = self._per_example.get(dedup_key(chosen.prompt), state.best_per_example)
        if improved:
            self.method.accepted(handle, chosen)
        state.stale_epochs = 0 if improved else state.stale_epochs + 1
        diagnosis = diagnose(
            epoch, new, state.best, state.history, [e.target for e in self.task.train], self.task.is_classification
        )
        state.flat_rounds = state.flat_rounds + 1 if diagnosis.flat else 0
        state.epoch = epoch
        state.keep_rng(rng)

        # Test-sample scoring runs beside the rounds; it belongs to the run, not to a round.
        by_stage = UsageMeter.since(self.meter.snapshot(), usage_before)
        by_stage.pop(TEST_SCORING, None)
        round_usage = Usage()
        for usage in by_stage.values():
            round_usage.add(usage)
        result = RoundResult(
            epoch=epoch,
            candidates=new,
            best=state.best,
            improved=improved,
            stage_stats=_stage_stats(new),
            usage=round_usage,
            usage_by_stage=by_stage,
            rejections=_rejections_since(state.rejections, rejections_before),
            wall_time=time.perf_counter() - started,
            state=state,
            stop_reason=stop_reason,
            diagnosis=diagnosis,
            concurrency=limiter.window() if limiter is not None else {},
            race=self._race_summary(new),
        )
        for rule in self.stop_rules:
            result.stop_reason = result.stop_reason or rule.check(state, result)
        state.stop_reason = result.stop_reason
        self._emit("on_round", result)
        return result

    # ----- stages ------------------------------------------------------------------------

    async def _ask(
        self, meta: templates.MetaPrompt, temperature: float, n: int, sample: str, stage: str | None = None
    ) -> list[str]:
        return await self.llm.complete(
            meta.messages,
            temperature=temperature,
            n=n,
            max_tokens=self.meta_max_tokens,
            stage=stage or meta.stage,
            sample=sample,
            priority=META,
            stop=templates.META_STOP,
        )

    def _extract(self, reply: str, meta: templates.MetaPrompt) -> Extraction:
        return extract_candidate(reply, meta, self.max_prompt_length)

    def _record(self, prompt: str, stage: str, epoch: int, parents: list[Candidate], note: str | None) -> Candidate:
        """Adds a candidate to the history; a prompt seen before is marked as a duplicate."""
        candidate = Candidate(
            id=len(self.state.history), prompt=prompt, stage=stage, epoch=epoch,
            parents=[parent.id for parent in parents], note=note,
        )
        known = self._by_text.get(dedup_key(candidate.prompt))
        if known is not None:
            candidate.duplicate_of = known.id
        else:
            self._by_text[dedup_key(candidate.prompt)] = candidate
        self.state.history.append(candidate)
        return candidate

    def _score_soon(self, candidates: list[Candidate]) -> None:
        if candidates:
            scoring = self._race(candidates) if self.racing else self._score_now(candidates)
            self._pending.append(asyncio.create_task(scoring))

    def _variables_problem(self, prompt: str) -> str | None:
        """For a template task: ``variable_dropped`` or ``variable_invented`` when the prompt's
        placeholders are not exactly the template's (the app could not fill it in)."""
        if self.task.template_variables is None:
            return None
        found, wanted = templates.placeholders(prompt), set(self.task.template_variables)
        if wanted - found:
            return "variable_dropped"
        if found - wanted:
            return "variable_invented"
        return None

    def _observed(self, prompt: str, examples: list[Example]) -> list[dict[str, str]] | None:
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
            note = score.notes[i] if i < len(score.notes) else ""
            observed.append({"output": _clip(score.outputs[i]), "score": f"{score.per_example[i]:.2f}", "notes": _clip(note)})
        return observed if any(observed) else None

    def _candidate_cost(self, candidates: int) -> int:
        cost = candidates * len(self.task.train)
        if self.validating and isinstance(self.selection, HighestScore):
            cost += min(candidates, self.selection.top) * len(self.task.val)
        return cost

    def _scoring_spent(self) -> int:
        by_stage = self.meter.snapshot()
        return sum(by_stage[stage].calls for stage in (TRAIN_SCORING, VAL_SCORING) if stage in by_stage)

    async def _budget_reached(self) -> str | None:
        if not (self.settings.max_calls or self.settings.max_total_tokens or self.settings.max_scoring_calls):
            return None
        # The budget counts every call the run made, served by the cache or not, so that a
        # rerun stops at the same stage; scoring in flight is counted once it has finished.
        await self._wait_pending()
        spent = Usage()
        for stage, usage in self.meter.snapshot().items():
            if stage != TEST_SCORING:
                spent.add(usage)
        if self.settings.max_calls and spent.calls >= self.settings.max_calls:
            return "budget_calls"
        if self.settings.max_scoring_calls and (
            self._scoring_spent() + self._candidate_cost(1) > self.settings.max_scoring_calls
        ):
            return "budget_scoring"  # not even one more candidate fits
        if self.settings.max_total_tokens and spent.tokens + spent.cached_tokens >= self.settings.max_total_tokens:
            return "budget_tokens"
        return None

    # ----- scoring -----------------------------------------------------------------------

    async def _score_now(self, candidates: list[Candidate]) -> None:
        scores = await self.evaluator.score([c.prompt for c in candidates], self.task.train, stage=TRAIN_SCORING)
        everywhere = list(range(len(self.task.train)))
        for candidate, score in zip(candidates, scores):
            self._take_score(candidate, score, everywhere)

    async def _race(self, candidates: list[Candidate]) -> None:
        """Scores new candidates block by block against the best prompt so far (``racing.py``)."""
        incumbent = self.state.best
        known = self._per_example.get(dedup_key(incumbent.prompt)) or self.state.best_per_example
        if known is None or len(known) != len(self.task.train):
            # a state saved before racing existed: its best prompt's per-example scores
            # were not kept, and are scored once more (the response cache answers them)
            log.info("scoring the best prompt once more for its per-example train scores")
            copy = Candidate(id=incumbent.id, prompt=incumbent.prompt, stage=incumbent.stage, epoch=incumbent.epoch)
            await self._score_now([copy])
            known = self._per_example[dedup_key(incumbent.prompt)]
        race = Race(self.evaluator, self.task, self._race_order, self.settings.race_block, self.settings.race_alpha,
                    known, TRAIN_SCORING)
        outcomes = await race.run([c.prompt for c in candidates])
        for candidate, outcome in zip(candidates, outcomes):
            self._take_score(candidate, outcome.score, outcome.positions)
            if outcome.stopped:
                candidate.eliminated_by = incumbent.id

    def _take_score(self, candidate: Candidate, score: Score, positions: list[int]) -> None:
        """Records a candidate's train score, which covers the train ``positions``."""
        key = dedup_key(candidate.prompt)
        if self.task.shows_outputs:
            self._train_scores[key] = (score, positions)
        if len(positions) == len(self.task.train):
            self._per_example[key] = list(score.per_example)
        candidate.score = score.value
        candidate.metrics = dict(score.metrics)
        candidate.parse_rate = score.parse_rate
        candidate.examples_scored = len(positions)
        if self.task.is_classification:
            candidate.answers = answer_counts(score.predictions)

    def _race_record(self, history: list[Candidate]) -> dict[str, Any]:
        """How the run's train scores were paid for, over every round (resumed ones too)."""
        settings = self.settings
        summary = self._race_summary([c for c in history if c.epoch > 0])
        how = {"scoring": "race", "block": settings.race_block, "alpha": settings.race_alpha} if self.racing else {"scoring": "full"}
        return {**how, **summary.to_dict()}

    def _race_summary(self, new: list[Candidate]) -> RaceSummary:
        scored = [c for c in new if c.duplicate_of is None and c.examples_scored is not None]
        stopped = [c for c in scored if c.eliminated_by is not None]
        return RaceSummary(
            candidates=len(scored),
            stopped=len(stopped),
            stopped_after=[c.examples_scored or 0 for c in stopped],
            requests=sum(c.examples_scored or 0 for c in scored),
            full_requests=len(scored) * len(self.task.train),
        )

    def _scores(self, candidate: Candidate, test: Score | None) -> dict[str, dict[str, float]]:
        """A candidate's scores by sample: train, validation (when the run selects on one), test."""
        scores = {"train": _train_metrics(candidate)}
        if self.validating:
            scores["val"] = {"score": candidate.val_score} if candidate.val_score is not None else {}
        scores["test"] = _test_metrics(test)
        return scores

    async def _score_val(self, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        scores = await self.evaluator.score([c.prompt for c in candidates], self.task.val, stage=VAL_SCORING)
        for candidate, score in zip(candidates, scores):
            candidate.val_score = score.value

    async def _score_test(self, prompt: str) -> Score | None:
        if not self.task.test:
            return None  # a task without a test sample (an app's train data only): no verdict
        (score,) = await self.evaluator.score([prompt], self.task.test, stage=TEST_SCORING)
        return score

    async def _unless_unavailable(self, scoring: Any) -> Score | None:
        try:
            return await scoring
        except EndpointUnavailable as error:
            self.failure = self.failure or str(error)
            return None

    def _use_state(self, state: RunState) -> RunState:
        """Makes ``state`` the run's state and indexes its prompts for duplicate detection."""
        self.state = state
        self._by_text = {}
        for candidate in state.history:
            self._by_text.setdefault(dedup_key(candidate.prompt), candidate)
        return state

    async def _wait_pending(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    async def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, []
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            notify(callback, event, *args)


def _clip(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _copy_score(duplicate: Candidate, original: Candidate) -> None:
    duplicate.score = original.score
    duplicate.val_score = original.val_score
    duplicate.answers = dict(original.answers)
    duplicate.metrics = dict(original.metrics)
    duplicate.parse_rate = original.parse_rate
    duplicate.examples_scored = original.examples_scored
    duplicate.eliminated_by = original.eliminated_by


def _test_metrics(score: Score | None) -> dict[str, float]:
    return score.summary() if score is not None else {}


def _train_metrics(candidate: Candidate) -> dict[str, float]:
    return {"score": candidate.score or 0.0, **candidate.metrics, "parse_rate": candidate.parse_rate or 0.0}


def _stage_stats(candidates: list[Candidate]) -> dict[str, dict[str, float]]:
    """Per stage: the mean train score of its scored candidates (a candidate a race stopped
    counts with its score on the examples it was scored on), how many they are and how many
    were stopped, and the best score among those scored on the whole train sample."""
    stats: dict[str, dict[str, float]] = {}
    for stage in dict.fromkeys(c.stage for c in candidates):
        mine = [c for c in candidates if c.stage == stage and c.score is not None]
        if not mine:
            continue
        scores = [c.score or 0.0 for c in mine]
        stats[stage] = {"mean": sum(scores) / len(scores), "count": float(len(mine)),
                        "stopped": float(sum(not c.selectable for c in mine))}
        whole = [c.score or 0.0 for c in mine if c.selectable]
        if whole:
            stats[stage]["best"] = max(whole)
    return stats


def _rejections_since(now: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    delta: dict[str, dict[str, int]] = {}
    for stage, reasons in now.items():
        for reason, count in reasons.items():
            extra = count - before.get(stage, {}).get(reason, 0)
            if extra:
                delta.setdefault(stage, {})[reason] = extra
    return delta


def _round_summary(result: RoundResult) -> dict[str, Any]:
    return {
        "epoch": result.epoch,
        "best_id": result.best.id,
        "best_score": result.best.score,
        "best_val_score": result.best.val_score,
        "improved": result.improved,
        "candidates": len(result.candidates),
        "scored": sum(1 for c in result.candidates if c.duplicate_of is None),
        "stage_stats": result.stage_stats,
        "usage": result.usage.to_dict(),
        "rejections": result.rejections,
        "wall_time_seconds": round(result.wall_time, 3),
        "stop_reason": result.stop_reason,
        "diagnosis": result.diagnosis.to_dict() if result.diagnosis else None,
        "concurrency": result.concurrency,
        "race": result.race.to_dict(),
    }
