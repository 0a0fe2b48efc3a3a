"""The public engine API: a method written outside the package runs in the same loop as
DistillPrompt (scoring, duplicates, selection, stop rules, events, budgets), through the
documented ``Method``/``Round``/``Selection``/``StopRule`` objects only."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from distillprompt import templates
from distillprompt.llm import UsageMeter
from distillprompt.optimizer import Callback, HighestScore, Method, Optimizer, Round, StopRule
from distillprompt.context import open_context
from distillprompt.executors import LocalExecutor
from tests.test_baselines import settings_for


class RewriteTwice(Method):
    """Two rewrites of the best prompt a round, plus the best prompt itself again (a duplicate)."""

    name = "rewrite-twice"

    def rounds(self, settings) -> int:
        return 3

    def selection(self, settings):
        return HighestScore(top=1)

    async def propose(self, current: Round) -> None:
        best = current.best
        current.method_state["rounds_seen"] = current.method_state.get("rounds_seen", 0) + 1
        meta = templates.rewrite(current.task, best.prompt, best.score or 0.0, current.task.metric)
        replies = await current.ask(meta, 0.7, 2, "twice", [best])
        admitted = current.admit(replies, "rewrite", [best])
        current.add(best.prompt, "again", [best], note="the best, once more")
        await current.end_stage("twice", admitted)


class StopAfter(StopRule):
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def check(self, state, result) -> str | None:
        return "enough" if result.round >= self.rounds else None


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    def on_stage(self, event) -> None:
        self.events.append(("stage", event.round, event.stage))

    def on_round(self, result) -> None:
        self.events.append(("round", result.round, str(result.stop_reason)))


def run_method(endpoint, reviews_dir, tmp_path, stop_rules=None):
    settings = settings_for(endpoint, reviews_dir, tmp_path, copy_retries=0, stop_when_flat=False)
    recorder = Recorder()

    async def go():
        async with AsyncExitStack() as stack:
            context = await open_context(settings, stack)
            loop = Optimizer(context.task, context.meta_llm, LocalExecutor().evaluator(context), settings.optimizer,
                             seed=0, meter=UsageMeter(), callbacks=[recorder], method=RewriteTwice(),
                             stop_rules=stop_rules)
            return await loop.run(), loop

    result, loop = asyncio.run(go())
    return result, loop, recorder


def test_a_method_of_ones_own_runs_in_the_loop(endpoint, reviews_dir, tmp_path):
    result, loop, recorder = run_method(endpoint, reviews_dir, tmp_path)
    assert result.stop_reason == "rounds" and [r.round for r in result.rounds] == [1, 2, 3]
    assert loop.state.method_state["rounds_seen"] == 3  # the method's own state lives in the run state
    again = [c for c in result.history if c.stage == "again"]
    assert len(again) == 3 and all(c.duplicate_of is not None for c in again)  # recognised, never rescored
    distinct = [c for c in result.history if c.duplicate_of is None]
    # every distinct prompt scored once on the 12 train examples (or until a race stopped it),
    # and the two test prompts on 10
    train_scoring = endpoint.requests(kind="scoring")
    assert len(train_scoring) == sum(c.examples_scored for c in distinct) + 10 * (1 if result.final.id == 0 else 2)
    # highest train score wins, ties keep the older prompt
    best = max(distinct, key=lambda c: (c.score, -c.id))
    assert result.final.id == best.id
    assert [e[:2] for e in recorder.events] == [("stage", 1), ("round", 1), ("stage", 2), ("round", 2), ("stage", 3), ("round", 3)]
    assert {c.stage for c in result.history} == {"initial", "rewrite", "again"}
    assert all(c.note == "the best, once more" for c in again)


def test_a_stop_rule_of_ones_own_ends_the_run(endpoint, reviews_dir, tmp_path):
    result, _, recorder = run_method(endpoint, reviews_dir, tmp_path, stop_rules=[StopAfter(2)])
    assert result.stop_reason == "enough" and len(result.rounds) == 2
    assert recorder.events[-1] == ("round", 2, "enough")
