"""MLflow's own prompt optimizers as methods of this project's loop (``--method
mlflow-gepa``, ``mlflow-metaprompt``), so ``compare`` can set them against DistillPrompt on
the same train sample, endpoint, response cache and test sample.

Each runs in one round: ``mlflow.genai.optimize_prompts`` with MLflow's optimizer, on the
run's train sample registered as its ``train_data``; the app it optimizes (``predict_fn``)
sends the task's own scoring request through the run's evaluator, and its scorer is the
task's per-example measure (correctness for labels), so MLflow's optimizer ranks by its
mean (accuracy) where the loop's methods rank by the task metric (macro-F1). Its result is the round's one candidate (scored on train like any other) and the
run's result, as for ``fewshot``. The optimizer model's calls go through the run's LLM
client too (cache, retries, limiter, usage by stage): GEPA's through its reflection
strategy, MetaPrompt's through a loopback OpenAI-compatible endpoint, since MLflow calls that
model over HTTP itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from unittest import mock  # patch.dict: set environment variables for a block and restore them

from distillprompt.data import Example
from distillprompt.errors import EndpointUnavailable, UserError
from distillprompt.engine import LatestCandidate, Method, Round, Selection
from distillprompt.settings import OptimizerSettings

log = logging.getLogger(__name__)

INPUT = "input"  # the one input MLflow's optimizers see: the example as the task renders it
NOMINAL_CANDIDATES = 16  # candidates a DistillPrompt round scores with the default counts (4+4+4+1+3)


class LoopCaller:
    """Calls into the run's event loop from MLflow's threads (predict_fn, the reflection
    model): runs one of the loop's coroutines there and waits for its result."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __call__(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()


class OccurrenceKeys:
    """Cache keys for an outside optimizer's requests: the k-th time one exact request is
    made in a run gets key k, so a rerun meets the same replies in the same order."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, messages: Any) -> str:
        text = json.dumps(messages, sort_keys=True, default=str)
        with self.lock:
            self.seen[text] += 1
            return f"{self.prefix}:{self.seen[text]}"


class MlflowOptimizerMethod(Method):
    """One round: MLflow's optimizer through ``mlflow.genai.optimize_prompts``."""

    name = ""
    stage = ""  # usage stage of the optimizer model's calls

    def rounds(self, settings: OptimizerSettings) -> int:
        return 1

    def patience(self, settings: OptimizerSettings) -> int:
        return 0

    def selection(self, settings: OptimizerSettings) -> Selection:
        return LatestCandidate()  # the outside optimizer decided; its result is the run's result

    def metric_calls(self, current: Round) -> int:
        """Scoring requests MLflow's optimizer may spend: the scoring budget less the loop's
        own scoring of the initial and final prompts, else a DistillPrompt-sized default."""
        train = len(current.task.train)
        if current.settings.max_scoring_calls:
            return max(train, current.settings.max_scoring_calls - 2 * train)
        return current.settings.rounds * NOMINAL_CANDIDATES * train

    async def propose(self, current: Round) -> None:
        on_loop = LoopCaller(asyncio.get_running_loop())
        initial = current.initial
        prompt, note = await asyncio.to_thread(self._optimize, current, on_loop)
        current.add(prompt, self.name, [initial], note=note)
        await current.end_stage(self.name, list(current.new))

    def make_optimizer(self, current: Round, on_loop: LoopCaller) -> Any:
        raise NotImplementedError

    def _optimize(self, current: Round, on_loop: LoopCaller) -> tuple[str, str]:
        import mlflow

        from .genai import _settle_prompt_links

        task = current.task
        by_input = {_rendered(current, example): example for example in task.train}
        # input -> the task's measure on it under the candidate being evaluated (MLflow
        # evaluates one candidate at a time); cleared before each app run, so a failed run
        # scores 0, never a value left by another candidate
        outcome: dict[str, float] = {}
        unavailable: list[EndpointUnavailable] = []

        name = f"distillprompt-{self.name}-{task.digest()[:8]}"
        prompt = mlflow.genai.register_prompt(name=name, template=current.initial.prompt,
                                              commit_message=f"initial prompt of a {self.name} run")

        def predict_fn(input: str) -> str:  # noqa: A002 - the name MLflow's records show
            # MLflow patches PromptVersion.template with the candidate while it evaluates; the
            # registered object is read rather than loaded again, since a load inside a trace
            # starts a thread linking it to the trace (see genai._settle_prompt_links)
            instruction = prompt.template
            outcome.pop(input, None)
            example = by_input.get(input)
            if example is None:
                raise UserError("the optimizer asked for an input that is not in the train sample")
            try:
                (score,) = on_loop(current.evaluate([instruction], [example]))
            except EndpointUnavailable as error:  # MLflow would score it 0 and go on: the run must stop
                unavailable.append(error)
                raise
            outcome[input] = score.per_example[0]
            return score.outputs[0]

        from mlflow.genai.scorers import scorer

        @scorer(name="task_metric")
        def task_metric(inputs: dict[str, Any], outputs: str) -> float:
            """The task's own metric for this example (accuracy for a label, else the generation metric)."""
            return outcome.get(inputs[INPUT], 0.0)

        train_data = [{"inputs": {INPUT: text}, "expectations": {"expected_response": example.target}}
                      for text, example in by_input.items()]
        _settle_prompt_links()
        # MLflow's optimizer does not log into the child run: the active run is per thread and
        # this is a worker thread; the loop's tracker records the round as for every method
        result = mlflow.genai.optimize_prompts(
            predict_fn=predict_fn, train_data=train_data, prompt_uris=[prompt.uri],
            optimizer=self.make_optimizer(current, on_loop), scorers=[task_metric], enable_tracking=False,
        )
        if unavailable:
            raise unavailable[0]
        optimized = result.optimized_prompts[0]
        template = optimized.template if isinstance(optimized.template, str) else json.dumps(optimized.template)
        note = (f"{self.name}: MLflow's score {result.initial_eval_score} -> {result.final_eval_score}; "
                f"registered {optimized.name} version {optimized.version}")
        return template.strip() or current.initial.prompt, note


def _settled(optimizer_class: type) -> type:
    """MLflow's optimizer class, with every ``eval_fn`` call made after MLflow's prompt-link
    threads finish (``optimize_prompts`` loads the prompt itself just before the first one;
    see ``genai._settle_prompt_links``)."""
    from .genai import _settled_call

    def optimize(self: Any, eval_fn: Any, train_data: Any, target_prompts: Any, enable_tracking: bool = True) -> Any:
        settled = None if eval_fn is None else functools.partial(_settled_call, eval_fn)
        return optimizer_class.optimize(self, settled, train_data, target_prompts, enable_tracking)

    return type(optimizer_class.__name__, (optimizer_class,), {"optimize": optimize})


def _rendered(current: Round, example: Example) -> str:
    from distillprompt.templates import render_inputs

    return render_inputs(current.task, example)


class MlflowGepa(MlflowOptimizerMethod):
    """MLflow's ``GepaPromptOptimizer``; GEPA's own reflection prompts, sent through the run's
    LLM client (its reflection strategy, so no LiteLLM is needed)."""

    name = "mlflow-gepa"
    stage = "gepa_reflection"

    def make_optimizer(self, current: Round, on_loop: LoopCaller) -> Any:
        from gepa.proposer.reflective_mutation.reflection_lm import StatelessReflectionLM
        from mlflow.genai.optimize.optimizers import GepaPromptOptimizer

        GepaPromptOptimizer = _settled(GepaPromptOptimizer)  # noqa: N806 - keeps MLflow's name in its records

        keys = OccurrenceKeys(self.stage)

        def reflection_model(prompt: str | list[dict[str, Any]]) -> str:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return on_loop(current.chat(messages, current.settings.temperature_rewrite, keys(messages), self.stage))

        return GepaPromptOptimizer(
            reflection_model=f"openai:/{current.optimizer_model}",
            max_metric_calls=self.metric_calls(current),
            gepa_kwargs={"reflection_strategy": StatelessReflectionLM(reflection_model), "seed": current.seed},
        )


class MlflowMetaPrompt(MlflowOptimizerMethod):
    """MLflow's ``MetaPromptOptimizer`` (one pass of its own meta-prompt over the train
    sample's results). MLflow sends its model requests over HTTP to ``OPENAI_API_BASE``, so
    a loopback endpoint takes them into the run's LLM client for the run's duration."""

    name = "mlflow-metaprompt"
    stage = "metaprompt"

    def with_scoring_budget(self, settings: OptimizerSettings, budget: int, train_size: int) -> OptimizerSettings:
        return settings  # one pass of its meta-prompt: nothing to bound

    def make_optimizer(self, current: Round, on_loop: LoopCaller) -> Any:
        from mlflow.genai.optimize.optimizers import MetaPromptOptimizer

        return _settled(MetaPromptOptimizer)(reflection_model=f"openai:/{current.optimizer_model}")

    def _optimize(self, current: Round, on_loop: LoopCaller) -> tuple[str, str]:
        keys = OccurrenceKeys(self.stage)

        def answer(body: dict[str, Any]) -> str:
            messages = body.get("messages") or []
            temperature = float(body.get("temperature", current.settings.temperature_rewrite))
            return on_loop(current.chat(messages, temperature, keys(messages), self.stage))

        # the environment is restored on the way out, OPENAI_BASE_URL included
        with LoopbackEndpoint(answer) as loopback, mock.patch.dict(os.environ, {"OPENAI_API_BASE": loopback.base_url,
                                                                  "OPENAI_API_KEY": "loopback"}):
            os.environ.pop("OPENAI_BASE_URL", None)  # no other client of the run reaches past the loopback
            return super()._optimize(current, on_loop)


class LoopbackEndpoint:
    """A loopback OpenAI-compatible chat endpoint that answers through ``answer`` (the run's
    LLM client). Written here because it must hand each request to the run's event loop;
    only ``/chat/completions`` is served."""

    def __init__(self, answer: Callable[[dict[str, Any]], str]) -> None:
        self.answer = answer
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                try:
                    text = loopback.answer(body)
                except Exception as error:  # noqa: BLE001 - the caller sees a 502 naming the failure
                    self._send(502, {"error": {"message": f"{type(error).__name__}: {error}"}})
                    return
                self._send(200, {
                    "id": "loopback", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                })

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, name="distillprompt-loopback", daemon=True)

    def __enter__(self) -> LoopbackEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
