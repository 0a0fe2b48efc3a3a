"""What the loop tells the outside: its events and results, as typed records, and the
``Callback`` that hears them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..data import Task
from ..diagnosis import RoundDiagnosis
from ..errors import UserError
from ..evaluation import TEST_SCORING, TRAIN_SCORING, VAL_SCORING, Score  # noqa: F401 - the stages, named here too
from ..llm import LLMCall, Usage
from ..state import Candidate, RunState
from ..verdict import Verdict
from .racing import RaceSummary

log = logging.getLogger(__name__)

# stop reasons the loop itself gives
ENDPOINT_UNAVAILABLE = "endpoint_unavailable"
MAX_COST = "max_cost"  # --max-cost was spent
FLAT_SIGNAL = "flat_signal"  # two rounds in a row showed no signal
ROUNDS_DONE = "rounds"  # the method's rounds ran out
STOPPED_BY_ERROR = "error"  # an error ended the run (result.json then holds what it paid for)
INTERRUPTED = "interrupted"  # Ctrl-C or a cancelled task


@dataclass
class StageEvent:
    """A stage of a round has its candidates (sent to scoring) and its drop counts."""

    round: int
    stage: str
    candidates: list[Candidate]
    rejected: dict[str, int]


@dataclass
class RoundResult:
    """A round, scored, selected and diagnosed, with the run state after it."""

    round: int
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

    def summary(self) -> RoundSummary:
        return RoundSummary(
            round=self.round, best_id=self.best.id, best_score=self.best.score, best_val_score=self.best.val_score,
            improved=self.improved, candidates=len(self.candidates),
            scored=sum(1 for c in self.candidates if c.duplicate_of is None), stage_stats=self.stage_stats,
            usage=self.usage, rejections=self.rejections, wall_time=self.wall_time, stop_reason=self.stop_reason,
            diagnosis=self.diagnosis, concurrency=self.concurrency, race=self.race,
        )


@dataclass
class RoundSummary:
    """What the run's result keeps of a round."""

    round: int
    best_id: int
    best_score: float | None
    best_val_score: float | None
    improved: bool
    candidates: int  # the round's candidates, duplicates included
    scored: int  # its distinct new ones
    stage_stats: dict[str, dict[str, float]]
    usage: Usage
    rejections: dict[str, dict[str, int]]
    wall_time: float
    stop_reason: str | None
    diagnosis: RoundDiagnosis | None
    concurrency: dict[str, float]
    race: RaceSummary

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "best_id": self.best_id,
            "best_score": self.best_score,
            "best_val_score": self.best_val_score,
            "improved": self.improved,
            "candidates": self.candidates,
            "scored": self.scored,
            "stage_stats": self.stage_stats,
            "usage": self.usage.to_dict(),
            "rejections": self.rejections,
            "wall_time_seconds": round(self.wall_time, 3),
            "stop_reason": self.stop_reason,
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "concurrency": self.concurrency,
            "race": self.race.to_dict(),
        }


@dataclass
class RunRecords:
    """What the front door adds to ``result.json`` beside the loop's own result, each as
    ``result.json`` holds it: the settings (flag name -> value, secrets left out), what the
    run learned its endpoints take, the response cache's figures, the estimate made before the
    run, the score-against-length summary and the executor's own record, by its name."""

    settings: dict[str, Any] = field(default_factory=dict)
    endpoint: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None
    pareto: dict[str, Any] | None = None
    executor: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        written = {"settings": self.settings, "endpoint": self.endpoint, "cache": self.cache,
                   "estimate": self.estimate, "pareto": self.pareto, **self.executor}
        return {key: value for key, value in written.items() if value is not None and value != {}}


@dataclass
class RunResult:
    """A finished run: both prompts with their scores by sample, every candidate, every round
    this process ran, what it cost, why it stopped and the test-sample verdict."""

    task: dict[str, Any]
    initial: Candidate
    final: Candidate
    initial_scores: dict[str, dict[str, float]]
    final_scores: dict[str, dict[str, float]]
    initial_test: Score | None  # None when the endpoint gave up before the test scoring
    final_test: Score | None
    history: list[Candidate]
    rounds: list[RoundSummary]
    usage: Usage
    usage_by_stage: dict[str, Usage]
    rejections: dict[str, dict[str, int]]
    wall_time: float
    stop_reason: str
    failure: str | None = None  # what made the endpoint give up, when it did
    verdict: Verdict | None = None  # did the final prompt beat the initial one on test
    diagnosis: str | None = None  # why the run could not improve, when a round showed no signal
    race: dict[str, Any] = field(default_factory=dict)  # how train scores were paid for, over all rounds
    # examples whose scoring request the endpoint refused (too long, a content filter), scored as wrong
    refused: list[dict[str, Any]] = field(default_factory=list)
    records: RunRecords = field(default_factory=RunRecords)  # what the front door adds to result.json

    @property
    def run_records(self) -> dict[str, Any]:
        """The records as ``result.json`` holds them (``mlflow_project/registry.py`` reads the
        endpoint's here)."""
        return self.records.to_dict()

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
            "rounds": [summary.to_dict() for summary in self.rounds],
            "rejections": self.rejections,
            "task": self.task,
            "final_candidate": self.final.id,
            "wall_time_seconds": round(self.wall_time, 3),
            "stop_reason": self.stop_reason,
            "test_outputs": {"initial": _outputs_record(self.initial_test), "final": _outputs_record(self.final_test)},
            "failure": self.failure,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "diagnosis": self.diagnosis,
            "race": self.race,
            "refused": self.refused,
            **self.records.to_dict(),
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
        """The run's final settings (``resolution.resolve``: demo defaults, paths, a resumed run's
        record and the embedded endpoint applied), frozen: the ones every part of the run reads."""

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

    def on_estimate(self, estimate: Any) -> None:
        """What the run will send and cost (``distillprompt.estimate.Estimate``), before it starts."""

    def on_end(self, succeeded: bool) -> None:
        """The run is over, finished or failed (called by the runner, also on errors)."""

    def on_llm_call(self, call: LLMCall) -> None:
        """One answered LLM request (meta-prompt or scoring), e.g. for per-request tracing.
        The runner subscribes only callbacks that override this."""

    @classmethod
    def wants_llm_calls(cls) -> bool:
        return cls.on_llm_call is not Callback.on_llm_call

    def incomplete(self) -> str | None:
        """After the run: what this callback could not finish and the command that finishes it
        (a tracking server that went away), or None. The CLI prints it and exits with 3."""
        return None


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


class Events:
    """The run's callbacks, told about each event in turn."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            notify(callback, event, *args)
