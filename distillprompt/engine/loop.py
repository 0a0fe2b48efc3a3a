"""The loop every method runs in.

Each round the ``Method`` proposes candidates through a ``Round``; every new distinct one is
scored on the train sample, the method's ``Selection`` picks the best, and the ``StopRule``s
and budgets decide whether another round runs. The loop knows nothing of where scoring runs
or where results are recorded: it talks to an ``LLM`` for meta-prompts, an ``Evaluator``
for scores and ``Callback``s for everything else.

Scoring of a stage's candidates starts as soon as the stage's replies are in, while the
next stage's meta-prompts are written; meta-prompts overtake queued scoring requests in the
shared request limiter, so the chain the round must wait for is never stuck behind scoring.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

from .. import templates
from ..data import Task
from ..diagnosis import diagnose
from ..errors import CostLimitReached, EndpointUnavailable, UserError
from ..evaluation import Evaluator, Score
from ..cost import CostCap
from ..llm import LLM, Usage, UsageMeter
from ..settings import OptimizerSettings
from ..state import Candidate, RunState
from ..verdict import judge
from .budgets import Budgets
from .events import (
    ENDPOINT_UNAVAILABLE, INTERRUPTED, MAX_COST, ROUNDS_DONE, STOPPED_BY_ERROR, TEST_SCORING, Callback, Events, RoundResult,
    RoundSummary, RunResult,
)
from .history import History
from .policies import FlatSignal, HighestScore, Method, Patience, StopRule
from .racing import start_warm_up
from .round import Round, LoopParts
from .scoring import Scoring
from .writer import MetaWriter


class Optimizer:
    """The loop: it scores the initial prompt, runs rounds of the ``Method``, selects with the
    method's ``Selection``, stops on a ``StopRule`` (the method's patience, no signal twice in
    a row) or a budget, scores the initial and final prompts on the test sample and judges
    the difference. Scoring goes through the ``Evaluator`` (in this process, Ray actors, or
    MLflow's ``eval_fn``); callbacks hear every event. ``runner.make_optimizer`` builds it
    for every front door (``optimize``, ``compare``, the MLflow optimizer)."""

    def __init__(
        self,
        task: Task,
        llm: LLM,
        evaluator: Evaluator,
        settings: OptimizerSettings,
        *,
        method: Method,
        seed: int,
        meter: UsageMeter,
        callbacks: list[Callback] | None = None,
        meta_max_tokens: int = 1024,
        state: RunState | None = None,
        stop_rules: list[StopRule] | None = None,
        cost_cap: CostCap | None = None,
    ) -> None:
        self.task = task
        self.settings = settings
        self.seed = seed
        self.meter = meter
        self.method = method
        self.selection = method.selection(settings)
        self.stop_rules = stop_rules if stop_rules is not None else [
            Patience(method.patience(settings)),
            *([FlatSignal(2)] if settings.stop_when_flat else []),
        ]
        self.events = Events(callbacks or [])
        self.writer = MetaWriter(llm, meta_max_tokens, settings.max_prompt_length)
        self.validating = bool(task.val) and self.selection.uses_validation
        validated = isinstance(self.selection, HighestScore) and self.validating
        self.scoring = Scoring(
            task, evaluator, settings, seed=seed, meter=meter,
            racing=settings.scoring == "race" and self.selection.races,
            validation_top=self.selection.top if validated else None,  # type: ignore[attr-defined]
        )
        self.limiter = llm.limiter
        self.budgets = Budgets(settings, meter, self.scoring, cost_cap)
        self._use_state(state or RunState(seed=seed))
        self.failure: str | None = None
        self.summaries: list[RoundSummary] = []  # the rounds this process finished
        self.result: RunResult | None = None  # once the run has its result
        self._started = time.perf_counter()

    @property
    def rounds(self) -> int:
        return self.method.rounds(self.settings)

    async def run(self, initial_prompt: str | None = None) -> RunResult:
        self._started = time.perf_counter()
        state = self.state
        if not state.history:
            prompt = (initial_prompt or "").strip() or templates.default_initial_prompt(self.task)
            state.history.append(Candidate(id=0, prompt=prompt, stage="initial", round=0))
        self._use_state(state)
        initial = state.history[0]
        self.events.emit("on_start", self.task, initial)
        scoring = self.scoring
        scoring.refused.load(state.refused)
        if scoring.racing:
            # the race's test imports scipy.stats (0.7-1.0 s); imported at the first test it held
            # the event loop and the run for that long (docs/decisions.md): now, beside the scoring
            start_warm_up()
        initial_test = asyncio.create_task(scoring.score_test(initial.prompt))
        try:
            await self._score_initial(initial)
            stop_reason = await self._rounds()
            state = self.state
            state.stop_reason = stop_reason
            self.events.emit("on_rounds_done", state)
            final = state.best
            initial_test_score = await self._unless_unavailable(initial_test)
            if final.id == initial.id:
                final_test_score = initial_test_score
            else:
                final_test_score = await self._unless_unavailable(scoring.score_test(final.prompt))
        finally:
            if not initial_test.done():
                initial_test.cancel()
            await scoring.cancel()
        result = self._result(stop_reason, initial_test_score, final_test_score)
        flat = [r.diagnosis.sentence for r in self.summaries if r.diagnosis and r.diagnosis.flat]
        result.diagnosis = flat[-1] if flat else None
        result.verdict = judge(
            metric=self.task.metric, labels=self.task.labels if self.task.is_classification else None,
            # the initial prompt kept by a method that looked for a better one (``initial`` does not)
            kept_initial=final.id == initial.id and self.rounds > 0, initial_test=initial_test_score,
            final_test=final_test_score, seed=self.seed,
        )
        self.result = result
        self.events.emit("on_finish", result)
        return result

    async def _score_initial(self, initial: Candidate) -> None:
        """The initial prompt on the train sample (and the validation sample, when the run
        selects on one), unless a resumed state holds its scores."""
        state, scoring = self.state, self.scoring
        try:
            if initial.score is None:
                await scoring.score_train([initial])
                _check_not_all_refused(initial)
            if state.best_record is None:
                state.best_record = scoring.record(state.best.prompt)
            if self.validating and initial.val_score is None:
                await scoring.score_validation([initial])
        except CostLimitReached as error:
            # the estimate let the budget through (cost.cost_cap), but the initial
            # prompt's own scoring cost more: there is nothing to optimize from
            raise UserError(f"{error} before the initial prompt was scored: raise --max-cost (a rerun pays "
                            "nothing twice: the replies are in the response cache)") from None

    async def _rounds(self) -> str:
        """The method's rounds, until a stop rule, a budget or the last round; the stop reason."""
        stop_reason = self.state.stop_reason
        while stop_reason is None and self.state.round < self.rounds:
            checkpoint = copy.deepcopy(self.state)
            self.budgets.mark()
            try:
                result = await self._round(self.state.round + 1)
            except EndpointUnavailable as error:
                # The endpoint gave up beyond every retry (or --max-cost was spent outside a
                # round's stages): forget the unfinished round (its replies are in the
                # cache) and stop with the best prompt of the finished ones.
                await self.scoring.cancel()
                self._use_state(checkpoint)
                if isinstance(error, CostLimitReached):
                    return MAX_COST
                self.failure = str(error)
                return ENDPOINT_UNAVAILABLE
            self.summaries.append(result.summary())
            stop_reason = result.stop_reason
        return stop_reason or ROUNDS_DONE

    def _result(self, stop_reason: str, initial_test: Score | None, final_test: Score | None) -> RunResult:
        """The run's result from its state: the best prompt so far is the final one."""
        state = self.state
        initial, final = state.history[0], state.best
        return RunResult(
            task=self.task.describe(),
            initial=initial,
            final=final,
            initial_scores=_by_sample(initial, initial_test, self.validating),
            final_scores=_by_sample(final, final_test, self.validating),
            initial_test=initial_test,
            final_test=final_test,
            history=list(state.history),
            rounds=list(self.summaries),
            usage=self.meter.total(),
            usage_by_stage=self.meter.snapshot(),
            rejections=state.rejections,
            wall_time=time.perf_counter() - self._started,
            stop_reason=stop_reason,
            failure=self.failure,
            race=self.scoring.race_record(state.history),
            refused=self.scoring.refused.to_list(),
        )

    def result_so_far(self, error: BaseException) -> RunResult | None:
        """For a run that ``error`` ended: its result, if it had one (a callback's deliberate
        stop after it), else what it paid for: every candidate made so far (those of the
        unfinished round too, scored or not), the best prompt of the finished rounds as the
        final one, the usage and the refusals, no test scores. None before the initial prompt
        exists."""
        if self.result is not None:
            return self.result
        if not self.state.history:
            return None
        interrupted = isinstance(error, (KeyboardInterrupt, asyncio.CancelledError))
        said = "interrupted" if interrupted else " ".join(str(error).split()) or type(error).__name__
        self.failure = self.failure or said
        return self._result(INTERRUPTED if interrupted else STOPPED_BY_ERROR, None, None)

    async def _round(self, number: int) -> RoundResult:
        """One round: the method proposes candidates (sent to scoring as they come), then the
        best is selected, the round is diagnosed and the stop rules are asked."""
        state = self.state
        started = time.perf_counter()
        usage_before = self.meter.snapshot()
        self.limiter.window()
        rng = state.rng()
        current = Round(number, rng, state, self.parts)
        try:
            await self.method.propose(current)
            current.send_to_scoring()
            await self.scoring.wait()
        except CostLimitReached:
            # --max-cost ran out inside a stage: the round ends as a budget ends it, with the
            # candidates scored so far (those cut short stay unscored, never selected)
            await self.scoring.wait_ignoring_failures()
            current.stop_reason = MAX_COST
        new = current.new
        for candidate in new:
            if candidate.duplicate_of is not None:
                _copy_score(candidate, state.history[candidate.duplicate_of])
        try:
            chosen = await self.selection.choose(current, new)
        except CostLimitReached:  # the validation of the round's top candidates was cut: keep the best
            await self.scoring.wait_ignoring_failures()
            current.stop_reason = MAX_COST
            chosen = state.best
        improved = chosen.id != state.best_id
        if improved:
            self.budgets.new_best(chosen.prompt, state.history[0].prompt)
        state.best_id = chosen.id
        state.best_record = self.scoring.record(chosen.prompt) or state.best_record
        if improved:
            self.method.accepted(current, chosen)
        state.stale_rounds = 0 if improved else state.stale_rounds + 1
        diagnosis = diagnose(
            number, new, state.best, state.history, [e.target for e in self.task.train], self.task.is_classification
        )
        state.flat_rounds = state.flat_rounds + 1 if diagnosis.flat else 0
        state.round = number
        state.keep_rng(rng)
        state.refused = self.scoring.refused.to_list()

        round_usage, by_stage = _round_usage(self.meter, usage_before)
        result = RoundResult(
            round=number, candidates=new, best=state.best, improved=improved, stage_stats=_stage_stats(new),
            usage=round_usage, usage_by_stage=by_stage, rejections=current.rejections,
            wall_time=time.perf_counter() - started, state=state, stop_reason=current.stop_reason,
            diagnosis=diagnosis, concurrency=self.limiter.window(), race=self.scoring.race_summary(new),
        )
        for rule in self.stop_rules:
            result.stop_reason = result.stop_reason or rule.check(state, result)
        state.stop_reason = result.stop_reason
        self.events.emit("on_round", result)
        return result

    def _use_state(self, state: RunState) -> None:
        """Makes ``state`` the run's state (a new one, or the checkpoint of a round rolled back)."""
        self.state = state
        self.parts = LoopParts(
            task=self.task, settings=self.settings, seed=self.seed, validating=self.validating, writer=self.writer,
            history=History(state), scoring=self.scoring, budgets=self.budgets, events=self.events,
        )

    async def _unless_unavailable(self, scoring: Any) -> Score | None:
        try:
            return await scoring
        except EndpointUnavailable as error:
            self.failure = self.failure or str(error)
            return None


def _copy_score(duplicate: Candidate, original: Candidate) -> None:
    duplicate.score = original.score
    duplicate.val_score = original.val_score
    duplicate.answers = dict(original.answers)
    duplicate.metrics = dict(original.metrics)
    duplicate.parse_rate = original.parse_rate
    duplicate.examples_scored = original.examples_scored
    duplicate.eliminated_by = original.eliminated_by
    duplicate.refused = original.refused


def _check_not_all_refused(initial: Candidate) -> None:
    """An endpoint that refuses every train request of the initial prompt is not refusing
    examples but the run's requests (a budget beyond the model's context, an instruction a
    content filter stops): nothing could be scored, so it is a setting to fix."""
    if initial.refused and initial.refused == initial.examples_scored:
        raise UserError(
            f"the endpoint refused the initial prompt's request for every one of the {initial.refused} train examples "
            "(too long for the model's context, or stopped by a content filter; the warning above says which): "
            "shorten the initial prompt or the inputs, or lower --answer-max-tokens"
        )


def _by_sample(candidate: Candidate, test: Score | None, validating: bool) -> dict[str, dict[str, float]]:
    """A candidate's scores by sample: train, validation (when the run selects on one), test."""
    train = {"score": candidate.score or 0.0, **candidate.metrics, "parse_rate": candidate.parse_rate or 0.0}
    scores: dict[str, dict[str, float]] = {"train": train}
    if validating:
        scores["val"] = {"score": candidate.val_score} if candidate.val_score is not None else {}
    scores["test"] = test.summary() if test is not None else {}
    return scores


def _round_usage(meter: UsageMeter, before: dict[str, Usage]) -> tuple[Usage, dict[str, Usage]]:
    """A round's usage, in all and by stage; the test-sample scoring, which runs beside the
    rounds, belongs to the run, not to a round."""
    by_stage = UsageMeter.since(meter.snapshot(), before)
    by_stage.pop(TEST_SCORING, None)
    total = Usage()
    for usage in by_stage.values():
        total.add(usage)
    return total, by_stage


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

