"""DistillPrompt as an optimizer of ``mlflow.genai.optimize_prompts``.

MLflow hands an optimizer an ``eval_fn`` (candidate templates × records → one
``EvaluationResultRecord`` per record: the app's output, the scorers' aggregated score and
their rationales), the train records and the templates to improve. ``DistillPromptOptimizer``
runs this project's loop (``distillprompt.runner.optimize_task``: the same ``Optimizer``
class as ``distillprompt optimize`` and ``compare``) with ``eval_fn`` as its scoring
function; its meta-prompts go to the optimizer model of your choice (any OpenAI-compatible
endpoint, or the embedded model when none is configured) through the response cache.

A chat prompt (a JSON list of messages, as MLflow 3.16 and later pass it; earlier versions
refuse chat prompts) is optimized message by message: every system message and every user
message's instruction part, each in a loop of its own with the ones before it in place;
inputs parts, few-shot example pairs and assistant messages stay as written. Every candidate
must keep the template's variables exactly (``{{question}}``): one that drops or invents a
variable is rejected and counted (``variable_dropped`` / ``variable_invented``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from distillprompt import runner, templates
from distillprompt.data import Example, Task
from distillprompt.errors import UserError
from distillprompt.evaluation import Score
from distillprompt.llm import META, PriorityLimiter, Usage
from distillprompt.engine import Callback, RoundResult, RunResult
from distillprompt.engine.racing import wait_warm_up
from distillprompt.settings import Settings, load_settings, setting_specs
from mlflow.entities import Metric
from mlflow.genai.optimize.optimizers import BasePromptOptimizer
from mlflow.genai.optimize.types import PromptOptimizerOutput

from .tracking import round_metrics
from .tracking.outbox import Outbox
from .tracking.params import log_settings
from .tracking.tracker import now_ms

log = logging.getLogger(__name__)

FAILED_PREDICTION = "Failed to invoke the predict_fn"  # how MLflow's eval_fn reports an app that raised
APP_SCORING = "scoring"


def settings_from_keywords(keywords: dict[str, Any]) -> Settings:
    """Settings from keyword arguments named like the CLI flags with underscores
    (``optimizer_model``, ``base_url``, ``rounds``, ``max_calls``, …), over the environment,
    a ``config`` file and the defaults, as for the CLI. The API key comes from the
    environment (``OPENAI_API_KEY``), never from code."""
    keywords = dict(keywords)
    config = keywords.pop("config", None)
    if "api_key" in keywords:
        raise UserError("DistillPromptOptimizer takes no api_key: set OPENAI_API_KEY in the environment")
    paths = {
        flag.lstrip("-").replace("-", "_"): spec
        for spec in setting_specs() if not spec.secret
        for flag in (spec.flag, spec.former_flag) if flag
    }
    overrides: dict[str, Any] = {}
    for name, value in keywords.items():
        spec = paths.get(name)
        if spec is None:
            raise UserError(f"DistillPromptOptimizer got an unknown setting {name!r}: use the CLI flag names with underscores")
        (overrides.setdefault(spec.group, {}) if spec.group else overrides)[spec.name] = value
    return load_settings(overrides, config)


@dataclass
class PromptTarget:
    """One template to optimize: a text template, or the instruction message of a chat one.

    When the placeholders sit in the last paragraphs only (``…\n\nReview: {{review}}``),
    those paragraphs are the inputs part and stay as written; the candidates are the
    instruction before them (no placeholder to lose). Otherwise the whole text is the
    candidate and must keep every placeholder."""

    name: str
    template: str
    messages: list[dict[str, Any]] | None = None
    position: int | None = None  # index of the optimized message in a chat template

    @classmethod
    def parse(cls, name: str, template: str, position: int | None = None) -> PromptTarget:
        """The template's target; for a chat template, the message at ``position`` (default:
        the first instruction message)."""
        messages = _chat_messages(template)
        if messages is None:
            return cls(name, template)
        if position is None:
            position = cls.instruction_positions(name, template)[0]
        return cls(name, template, messages, position)

    @classmethod
    def instruction_positions(cls, name: str, template: str) -> list[int]:
        """Which messages of a chat template are instructions, optimized one after the
        other: every system message, and every user message with an instruction part (a
        line with words and no placeholder before its inputs). A user message that only
        lays out inputs (``Review: {{review}}``) and assistant messages stay as written.
        When no message qualifies: the system message, else the first user message."""
        messages = _chat_messages(template) or []
        positions = []
        for i, message in enumerate(messages):
            target = cls(name, template, messages, i)
            role = str(message.get("role"))
            if role == "system" and target.text.strip():
                positions.append(i)
            elif role == "user" and _worded(target.instruction) and (
                target.tail  # an instruction part before the app's inputs
                # a user message without inputs is an instruction unless an answer follows it
                # (then it is a few-shot example, kept as written with its answer)
                or not templates.placeholders(target.text) and not _answered(messages, i)
            ):
                positions.append(i)
        if positions:
            return positions
        roles = [str(message.get("role")) for message in messages]
        return [roles.index("system") if "system" in roles else roles.index("user") if "user" in roles else 0]

    @property
    def text(self) -> str:
        """The text being optimized: the template, or its instruction message (whole)."""
        if self.messages is None:
            return self.template
        return str(self.messages[self.position or 0].get("content", ""))

    @cached_property
    def tail(self) -> str:
        """The inputs part kept as written ("" when the placeholders are not all at the end)."""
        paragraphs = re.split(r"(\n\s*\n)", self.text)
        texts = paragraphs[::2]
        first = next((i for i, part in enumerate(texts) if templates.placeholders(part)), None)
        if first is None or first == 0:
            return ""
        head = "".join(paragraphs[: 2 * first - 1])
        if not head.strip():
            return ""
        return self.text[len(head):]

    @property
    def instruction(self) -> str:
        return self.text[: len(self.text) - len(self.tail)] if self.tail else self.text

    def render(self, instruction: str) -> str:
        """The whole template with ``instruction`` in place (chat: JSON-serialized again)."""
        text = instruction.rstrip() + self.tail if self.tail else instruction
        if self.messages is None:
            return text
        messages = [dict(message) for message in self.messages]
        messages[self.position or 0]["content"] = text
        return json.dumps(messages, ensure_ascii=False)


def _worded(text: str) -> bool:
    """Some line with words and no placeholder."""
    return any(re.search(r"[A-Za-z]", line) and not templates.placeholders(line) for line in text.splitlines())


def _answered(messages: list[dict[str, Any]], position: int) -> bool:
    return position + 1 < len(messages) and str(messages[position + 1].get("role")) == "assistant"


def _chat_messages(template: str) -> list[dict[str, Any]] | None:
    if not template.lstrip().startswith("["):
        return None
    try:
        value = json.loads(template)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        return _text(next(iter(value.values())))
    return json.dumps(value, ensure_ascii=False, default=str)


def build_task(target: PromptTarget, records: list[dict[str, Any]]) -> Task:
    """The loop's task for one template: every train record an example (its inputs, its
    expected output as text), no test sample, the scorers' score as the metric."""
    variables = sorted(templates.placeholders(target.instruction))
    inputs = list(dict.fromkeys(key for record in records for key in (record.get("inputs") or {})))
    examples = [
        Example(
            index=i,
            inputs={key: _text((record.get("inputs") or {}).get(key)) for key in inputs},
            target=_text(record.get("expectations") or record.get("outputs")) or "(none given)",
        )
        for i, record in enumerate(records)
    ]
    return Task(
        name=target.name,
        source="mlflow.genai.optimize_prompts",
        task_type="generation",
        input_columns=inputs or variables,
        label_column="expectations",
        labels=[],
        train=examples,
        test=[],
        train_split="train_data",
        test_split="",
        sizes={"train_data": len(records)},
        template_variables=variables,
        metric_name="score of the app's scorers",
        shows_outputs=True,
    )


class EvalFnEvaluator:
    """The loop's scoring function over MLflow's ``eval_fn``: one call per candidate on the
    train records (MLflow runs the app on them in its own thread pool). ``eval_fn`` is not
    thread-safe, so calls take turns; each app run counts as one call in the usage meter, so
    ``max_calls`` bounds the app's calls too.

    While ``eval_fn`` runs, MLflow switches on OpenAI autologging for the whole process, so
    the evaluator first takes every slot of the run's request limiter: the optimizer's own
    requests wait until the app is scored, never traced into the user's run (docs/decisions.md)."""

    def __init__(
        self,
        eval_fn: Callable[[dict[str, str], list[dict[str, Any]]], list[Any]],
        target: PromptTarget,
        records: list[dict[str, Any]],
        fixed: dict[str, str],
        meter: Any,
        limiter: PriorityLimiter,
    ) -> None:
        self.eval_fn = eval_fn
        self.target = target
        self.records = records
        self.fixed = fixed  # templates optimized before this one, in their new form
        self.meter = meter
        self.limiter = limiter
        self._turn = asyncio.Lock()

    async def score(self, prompts: list[str], examples: list[Example], stage: str = APP_SCORING) -> list[Score]:
        scores = []
        for prompt in prompts:
            async with self._turn:
                chosen = [self.records[example.index] for example in examples]
                candidates = {**self.fixed, self.target.name: self.target.render(prompt)}
                held = 0
                try:
                    while held < self.limiter.capacity:
                        await self.limiter.acquire(META)
                        held += 1
                    results = await asyncio.to_thread(_settled_call, self.eval_fn, candidates, chosen)
                finally:
                    for _ in range(held):
                        self.limiter.release()
            self.meter.record(stage, Usage(answered=len(results)))
            scores.append(_score(results, examples))
        return scores


def _score(results: list[Any], examples: list[Example]) -> Score:
    if any(result.score is None for result in results):
        raise UserError("DistillPrompt ranks candidates by the scorers' score: pass scorers=[...] to optimize_prompts")
    values = [float(result.score) for result in results]
    outputs = [_text(result.outputs) for result in results]
    metrics: dict[str, float] = {"score": sum(values) / len(values) if values else 0.0}
    for scorer in dict.fromkeys(name for result in results for name in (result.individual_scores or {})):
        found = [float(r.individual_scores[scorer]) for r in results if scorer in (r.individual_scores or {})]
        metrics[scorer] = sum(found) / len(found)
    answered = sum(not output.startswith(FAILED_PREDICTION) for output in outputs)
    return Score(
        value=metrics["score"],
        metrics=metrics,
        outputs=outputs,
        predictions=[None] * len(results),
        targets=[example.target for example in examples],
        parse_rate=answered / len(outputs) if outputs else 0.0,
        per_example=values,
        notes=["; ".join(f"{name}: {text}" for name, text in (result.rationales or {}).items() if text) for result in results],
    )


class RoundLogger(Callback):
    """Per-round metrics on the run ``optimize_prompts`` opened (step = round), the same
    metrics as ``distillprompt optimize`` logs; prefixed with the prompt's name when several
    prompts are optimized in one run. The calls go to a queue of their own (``Outbox``), so a
    tracking server that goes away does not hold the loop; the loop's end waits for it at most
    ``wait`` seconds (``--tracking-wait``), then says what did not reach it."""

    def __init__(self, prefix: str = "", wait: float = 20.0) -> None:
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr] - only made for a tracked run
        self.prefix = prefix
        self.outbox = Outbox(mlflow.get_tracking_uri(), wait=wait, attach=lambda: None, name="distillprompt-rounds")

    def on_round(self, result: RoundResult) -> None:
        metrics = {f"{self.prefix}{name}": value for name, value in round_metrics(result).items()}
        stamp = now_ms()
        self.outbox.submit(f"round {result.round} metrics", lambda: self.client.log_batch(
            self.run_id, metrics=[Metric(key, value, stamp, result.round) for key, value in metrics.items()]))

    def on_finish(self, result: RunResult) -> None:
        history = {"history": [candidate.to_dict() for candidate in result.history], "rejections": result.rejections,
                   "stop_reason": result.stop_reason, "usage": result.usage.to_dict()}
        self.outbox.submit("history", lambda: self.client.log_dict(
            self.run_id, history, f"distillprompt/{self.prefix or ''}history.json"))
        lost = self.outbox.close()
        if lost is not None:
            log.warning("DistillPrompt's round metrics did not all reach MLflow (%s, at %s); the loop's result is "
                        "in the optimizer's results", lost, self.outbox.failed)


class DistillPromptOptimizer(BasePromptOptimizer):
    """DistillPrompt for ``mlflow.genai.optimize_prompts``.

    Keyword arguments are the CLI settings with underscores, e.g. ``optimizer_model``,
    ``base_url`` (the optimizer model's endpoint; none configured: the embedded model),
    ``rounds``, ``concurrency``, ``max_calls``, ``seed``, ``rewrites``, ``cache_path``;
    ``config`` names a settings file as ``--config`` does. The API key is read from
    ``OPENAI_API_KEY``.

    After ``optimize``, ``results`` holds each loop's ``RunResult`` by prompt name, or by
    ``name:<message index>`` when a chat prompt had several instruction messages."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings_from_keywords(settings)  # a wrong name or value fails here, not mid-run
        self.results: dict[str, RunResult] = {}
        _settle_prompt_links()

    def optimize(
        self,
        eval_fn: Callable[[dict[str, str], list[dict[str, Any]]], list[Any]] | None,
        train_data: list[dict[str, Any]],
        target_prompts: dict[str, str],
        enable_tracking: bool = True,
    ) -> PromptOptimizerOutput:
        if eval_fn is None or not train_data:
            raise UserError("DistillPrompt needs train_data and scorers: pass both to mlflow.genai.optimize_prompts")
        import mlflow

        tracking = enable_tracking and mlflow.active_run() is not None
        if tracking:
            log_settings(mlflow, mlflow.active_run().info.run_id, self.settings.public_dict(),
                         prefix="distillprompt.", artifact="distillprompt/settings.json")
        optimized: dict[str, str] = {}
        first: RunResult | None = None
        last: RunResult | None = None
        for name, template in target_prompts.items():
            positions: list[int | None] = (
                list(PromptTarget.instruction_positions(name, template)) if _chat_messages(template) else [None]
            )
            for position in positions:  # a chat prompt's instruction messages, one after the other
                target = PromptTarget.parse(name, template, position)
                task = build_task(target, train_data)
                fixed = dict(optimized)
                key = name if len(positions) == 1 else f"{name}:{position}"
                prefix = (f"{name}." if len(target_prompts) > 1 else "") + (f"message{position}." if len(positions) > 1 else "")
                callbacks: list[Callback] = [RoundLogger(prefix, self.settings.mlflow.tracking_wait)] if tracking else []

                def evaluator(context: Any, target: PromptTarget = target, fixed: dict[str, str] = fixed) -> EvalFnEvaluator:
                    return EvalFnEvaluator(eval_fn, target, train_data, fixed, context.meter, context.limiter)

                result = _run_async(runner.optimize_task(self.settings, task, evaluator, target.instruction, callbacks=callbacks))
                self.results[key] = result
                template = target.render(result.final_prompt)  # the next message is optimized with this one in place
                first = first or result
                last = result
                log.info("%s: score %.4f -> %.4f (%s)", key, result.initial.score or 0.0, result.final.score or 0.0,
                         result.stop_reason)
            optimized[name] = template
        assert first is not None and last is not None
        return PromptOptimizerOutput(
            optimized_prompts=optimized,
            initial_eval_score=first.initial.score,
            final_eval_score=last.final.score,
            initial_eval_score_per_scorer=_per_scorer(first.initial.metrics),
            final_eval_score_per_scorer=_per_scorer(last.final.metrics),
        )


PROMPT_LINK_THREADS = ("link_prompt_to_experiment_thread", "link_prompts_from_exporter")
PROMPT_LINK_WAIT = 30.0  # seconds; one registry request each


def _settle_prompt_links() -> None:
    """Waits for MLflow's background threads that link a registered or loaded prompt to the
    experiment or to a trace: one importing while an ``eval_fn`` call sets up autologging
    deadlocks on MLflow's import hooks (docs/decisions.md). Called before each ``eval_fn``
    call and before ``optimize_prompts`` starts.

    MLflow offers no public call that waits for these threads, so they are known by the names
    MLflow 3.14 to 3.17 give them; a release that renames them makes this wait for nothing
    (the deadlock can come back), it never fails."""
    for thread in threading.enumerate():
        if thread.name.startswith(PROMPT_LINK_THREADS) and thread is not threading.current_thread():
            thread.join(PROMPT_LINK_WAIT)


def _settled_call(eval_fn: Callable[..., Any], *args: Any) -> Any:
    _settle_prompt_links()
    wait_warm_up()  # racing's import thread: the same deadlock as the link threads'
    return eval_fn(*args)


def _per_scorer(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if name != "score"}


def _run_async(work: Any) -> Any:
    """Runs a coroutine to its end from synchronous code, also where an event loop is already
    running (a notebook): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


__all__ = ["DistillPromptOptimizer", "PromptTarget", "EvalFnEvaluator", "build_task", "settings_from_keywords"]
