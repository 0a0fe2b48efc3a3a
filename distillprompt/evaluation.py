"""Scoring prompts on examples: the ``Evaluator`` protocol and an in-process implementation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .data import Example, Task
from .llm import LLM, SCORING, Send
from .metrics import ANSWER_STOP, answer_text, classification_scores, generation_scores, parse_label
from .templates import message_maker

# the usage stages of the loop's own scoring, named by the sample scored
TRAIN_SCORING = "train"
VAL_SCORING = "validation"
TEST_SCORING = "test"


@dataclass
class Score:
    """How one prompt did on a list of examples, with every per-example output kept."""

    value: float
    metrics: dict[str, float]
    outputs: list[str]
    predictions: list[str | None]
    targets: list[str]
    parse_rate: float
    per_example: list[float]  # correctness (classification) or the metric, per example
    notes: list[str] = field(default_factory=list)  # per example, what the scorers said (when they say it)
    # per example, why the endpoint refused its request ("" where it answered; empty: it refused none):
    # such an example has an empty output, scored as an unparsed answer
    refused: list[str] = field(default_factory=list)

    @property
    def refused_count(self) -> int:
        return sum(1 for reason in self.refused if reason)

    def summary(self) -> dict[str, Any]:
        return {"score": self.value, **self.metrics, "parse_rate": self.parse_rate}


@dataclass
class ScoringRequest:
    """One (prompt, example) pair to answer, with its position in the batch."""

    prompt_index: int
    example_index: int
    messages: list[dict[str, str]] = field(repr=False)


class Evaluator(Protocol):
    """Scores each prompt on every example; ``stage`` names the work in usage reports."""

    async def score(self, prompts: list[str], examples: list[Example], stage: str = TRAIN_SCORING) -> list[Score]: ...


def scoring_requests(task: Task, prompts: list[str], examples: list[Example]) -> list[ScoringRequest]:
    requests = []
    for p, prompt in enumerate(prompts):
        make = message_maker(task, prompt)
        requests += [ScoringRequest(p, e, make(example)) for e, example in enumerate(examples)]
    return requests


def score_outputs(task: Task, outputs: list[str], examples: list[Example], refused: list[str] | None = None) -> Score:
    """Parses the answers of one prompt and computes the task's metrics (``refused``: per
    example, why the endpoint refused its request, "" where it answered)."""
    targets = [example.target for example in examples]
    if task.is_classification:
        predictions = [parse_label(output, task.labels) for output in outputs]
        metrics = classification_scores(predictions, targets, task.labels)
        value = metrics["macro_f1"]
        per_example = [float(p == t) for p, t in zip(predictions, targets)]
    else:
        predictions = [answer_text(output) or None for output in outputs]
        metrics, per_example = generation_scores([p or "" for p in predictions], targets, task.generation_metric)
        value = metrics[task.generation_metric]
    parsed = sum(prediction is not None for prediction in predictions)
    return Score(
        value=value,
        metrics=metrics,
        outputs=list(outputs),
        predictions=predictions,
        targets=targets,
        parse_rate=parsed / len(outputs) if outputs else 0.0,
        per_example=per_example,
        refused=list(refused) if refused and any(refused) else [],
    )


def merge_scores(task: Task, parts: list[Score]) -> Score:
    """One prompt's scores on several lists of examples as its score on all of them: the
    per-example records joined, macro-F1 counted again over every answer (classification);
    the other metrics are means over examples, so their example-weighted means."""
    if len(parts) == 1:
        return parts[0]
    joined: dict[str, list[Any]] = {name: [] for name in ("outputs", "predictions", "targets", "per_example", "notes")}
    for part in parts:
        for name, values in joined.items():
            values.extend(getattr(part, name))
    count = len(joined["per_example"])
    if len(joined["notes"]) != count:
        joined["notes"] = []
    refused = [reason for part in parts for reason in (part.refused or [""] * len(part.per_example))]
    joined["refused"] = refused if any(refused) else []
    if task.is_classification:
        metrics = classification_scores(joined["predictions"], joined["targets"], task.labels)
        value = metrics["macro_f1"]
    else:
        weights = [len(part.per_example) for part in parts]
        names = dict.fromkeys(name for part in parts for name in part.metrics)
        metrics = {name: _weighted(weights, [part.metrics.get(name, 0.0) for part in parts]) for name in names}
        value = _weighted(weights, [part.value for part in parts])
    parse_rate = _weighted([len(part.per_example) for part in parts], [part.parse_rate for part in parts])
    return Score(value=value, metrics=metrics, parse_rate=parse_rate, **joined)


def _weighted(weights: list[int], values: list[float]) -> float:
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, values)) / total if total else 0.0


def assemble(
    task: Task, prompts: list[str], examples: list[Example], outputs: list[str], refused: list[str] | None = None
) -> list[Score]:
    """Splits a flat list of outputs (prompt-major order), and of the reasons requests were
    refused for, into one Score per prompt."""
    width = len(examples)
    refused = refused or [""] * len(outputs)
    return [
        score_outputs(task, outputs[i * width : (i + 1) * width], examples, refused[i * width : (i + 1) * width])
        for i in range(len(prompts))
    ]


class InProcessEvaluator:
    """Scores by answering one request per (prompt, example), a stage's worth at once, in
    this process's event loop through the shared LLM client and its limiter; with ``send``
    (a ChatClient's hook) each attempt is made elsewhere, e.g. by Ray actors."""

    def __init__(
        self,
        task: Task,
        llm: LLM,
        *,
        send: Send | None = None,
        max_tokens: int = 256,
        on_request_done: Callable[[int], None] | None = None,
        on_requests_planned: Callable[[int], None] | None = None,
    ) -> None:
        self.task = task
        self.llm = llm
        self.send = send
        self.max_tokens = max_tokens
        self.stop = ANSWER_STOP  # the reply is complete once the answer tag closes
        self.on_request_done = on_request_done
        self.on_requests_planned = on_requests_planned

    async def score(self, prompts: list[str], examples: list[Example], stage: str = TRAIN_SCORING) -> list[Score]:
        requests = scoring_requests(self.task, prompts, examples)
        if self.on_requests_planned:
            self.on_requests_planned(len(requests))
        refused = [""] * len(requests)

        def on_refused(index: int, reason: str) -> None:  # refused for its length or content: a wrong answer
            refused[index] = reason

        outputs = await self.llm.complete_many(
            [request.messages for request in requests], temperature=0.0, max_tokens=self.max_tokens, stage=stage,
            priority=SCORING, stop=self.stop, send=self.send, on_done=self.on_request_done, on_refused=on_refused,
        )
        return assemble(self.task, prompts, examples, outputs, refused)
