"""Wires one run together: settings → task → LLM clients → evaluator → optimizer → result.json.

The CLI and the MLflow entry points both call these functions; they add their own
callbacks (progress display, tracking) and evaluator factories (Ray), nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

from . import pareto, templates
from .cache import ResponseCache
from .data import Task, load_task
from .errors import UserError
from .estimate import Estimate, estimate_run
from .evaluation import Evaluator, InProcessEvaluator, Score
from .llm import Accepts, Adaptive, ChatClient, CostGuard, PriorityLimiter, RateBudget, UsageMeter, check_endpoint
from .local_llm import LocalServer, bundled_model, custom_model
from .methods import METHODS, method_for
from .engine import TEST_SCORING, Callback, Optimizer, RunResult, notify
from .engine.racing import start_warm_up
from .progress import ConsoleProgress
from .settings import AUTO_START_CONCURRENCY, LLMSettings, Settings
from .state import RunState
from .urls import request_parts

log = logging.getLogger(__name__)

EXECUTOR_PLUGINS = "distillprompt.executors"
RESUME_SOURCES = "distillprompt.resume_sources"  # where a run to resume (--resume RUN_ID) is found: MLflow


@dataclass
class RunContext:
    """Everything a run shares: the task, the clients, the cache, the meter and the limiter."""

    settings: Settings
    task: Task
    meter: UsageMeter
    limiter: PriorityLimiter
    cache: ResponseCache | None
    meta_llm: ChatClient
    target_llm: ChatClient
    progress: ConsoleProgress | None = None


def output_folder(settings: Settings) -> Path:
    if settings.output is not None:
        return Path(settings.output).expanduser().resolve()
    return (Path("distillprompt-output") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


DEMO_DATASET = Path(__file__).resolve().parent / "demo"
# Sized so that the whole demo (embedded 135M model, 2 cores) ends within 5 minutes with an
# empty response cache: 2 rounds of 9 candidates (2 rewrites, each distilled and compressed,
# one aggregate, 2 paraphrases) raced on all 100 train reviews, then 30 test reviews.
DEMO_SIZES = {
    "data": {"train_size": 100, "test_size": 30},
    "optimizer": {"rounds": 2, "rewrites": 2, "paraphrases": 2},
}


def with_demo_defaults(settings: Settings) -> Settings:
    """No dataset (or ``--dataset demo``) means the bundled demo task, with the demo's sizes
    for every size the user did not set."""
    if settings.data.dataset not in (None, "", "demo"):
        return settings
    demo = settings.model_copy(deep=True)
    demo.data.dataset = str(DEMO_DATASET)
    for group, sizes in DEMO_SIZES.items():
        section = getattr(demo, group)
        for name, value in sizes.items():
            if name not in getattr(settings, group).model_fields_set:
                setattr(section, name, value)
    return demo


EMBEDDED_META_MAX_TOKENS = 256


def start_local_llm(settings: Settings, stack: ExitStack | AsyncExitStack) -> tuple[Settings, LocalServer | None]:
    """Starts the embedded server when the settings ask for it (it then serves both roles,
    unless the optimizer has an endpoint of its own); returns settings pointing at it."""
    if not settings.uses_local_llm:
        return settings, None
    model = custom_model(settings.llm.local_model) if settings.llm.local_model else bundled_model()
    server = LocalServer(model, threads=settings.llm.local_threads, context=settings.llm.local_context).start()
    stack.callback(server.stop)
    local = settings.model_copy(deep=True)
    local.llm.backend = "local"
    if local.llm.concurrency == "auto":
        # the embedded server answers from a queue and never says 429: a fixed bound
        local.llm.concurrency = AUTO_START_CONCURRENCY
    local.llm.base_url = server.base_url
    local.llm.model = model.alias
    if not settings.llm.optimizer_base_url:
        local.llm.optimizer_model = None
        if "meta_max_tokens" not in settings.llm.model_fields_set:
            # the 135M model writes prompts of 20 to 100 tokens; what runs on past this cap is
            # rambling that costs seconds a reply on 2 cores (and is dropped as too long)
            local.llm.meta_max_tokens = EMBEDDED_META_MAX_TOKENS
    return local, server


def anchor_paths(settings: Settings) -> Settings:
    """The settings with local paths made absolute, so that nothing that changes the working
    directory later (ray.init inside a Ray Job does) moves them."""
    anchored = settings.model_copy(deep=True)
    dataset = anchored.data.dataset
    if dataset and Path(dataset).expanduser().exists():
        anchored.data.dataset = str(Path(dataset).expanduser().resolve())
    anchored.cache.path = Path(anchored.cache.path).expanduser().resolve()
    return anchored


def _require_endpoint(url: str | None) -> str:
    if not url:
        raise UserError(
            "no LLM endpoint configured: pass --base-url (or set OPENAI_BASE_URL) to an OpenAI-compatible API"
        )
    return url


def client_options(settings: Settings) -> dict[str, Any]:
    """The endpoint options every ChatClient of a run shares (the driver's and Ray actors')."""
    llm = settings.llm
    return dict(
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        timeout=llm.timeout,
        max_retries=llm.max_retries,
        backoff_base=llm.backoff_base,
        backoff_max=llm.backoff_max,
        price_input=llm.price_input,
        price_output=llm.price_output,
        reasoning_room=llm.reasoning_tokens,
    )


async def open_context(
    settings: Settings,
    stack: AsyncExitStack,
    progress: ConsoleProgress | None,
    *,
    need_train: bool = True,
    local: LocalServer | None = None,
    task: Task | None = None,
    with_target: bool = True,
) -> RunContext:
    """Loads the task (unless one is given), checks the endpoints and opens the clients.
    ``with_target=False``: the caller scores prompts its own way (``optimize_task``), so only
    the optimizer model is checked and opened, and it stands in as ``target_llm``."""
    meta_url = _require_endpoint(settings.optimizer_base_url)
    target_url = _require_endpoint(settings.llm.base_url) if with_target else meta_url
    target_model = settings.llm.model if with_target else settings.optimizer_model
    options = client_options(settings)
    checks = {(target_url, target_model), (meta_url, settings.optimizer_model)}
    if options["api_key"] and any(request_parts(url).authorization for url in {target_url, meta_url}):
        log.warning("an endpoint URL carries a user and password: they go as HTTP basic auth, in the Authorization "
                    "header, and the API key is not sent to that endpoint")

    async def check() -> None:
        if local is not None:
            await asyncio.to_thread(local.wait_ready)
        try:
            await asyncio.gather(*(check_endpoint(url, options["api_key"], model) for url, model in checks))
        except UserError as error:
            if not (settings.resume and settings.cache.enabled):
                raise
            # a --resume that completes an MLflow record is answered by the cache: the
            # endpoint may be down by then, or its key not in this environment
            log.warning("%s; --resume goes on from the response cache, and a request it does not hold will fail",
                        error)

    # The data loads while the endpoints are checked; a data error is reported first, as
    # when one came after the other.
    loading = asyncio.to_thread(
        load_task, settings.data, settings.seed, need_train=need_train, context_tokens=settings.llm.known_context
    ) if task is None else None
    if need_train and settings.optimizer.scoring == "race":
        start_warm_up()  # racing's statistics library, imported in the background
    loaded, checked = await asyncio.gather(loading or asyncio.sleep(0, task), check(), return_exceptions=True)
    for outcome in (loaded, checked):
        if isinstance(outcome, BaseException):
            raise outcome
    task = loaded

    cache = ResponseCache(settings.cache.path) if settings.cache.enabled else None
    if cache is not None:
        stack.callback(cache.close)
    meter = UsageMeter()
    limiter = make_limiter(settings.llm)
    common = dict(
        options, limiter=limiter, meter=meter, cache=cache, n_mode=settings.llm.n_mode, seed=settings.seed
    )
    identity = local.model.identity if local is not None else None
    # what the target's endpoint takes (learned from its refusals) holds for the whole run
    target = ChatClient(base_url=target_url, model=target_model, cache_identity=identity,
                        accepts=Accepts(target_url.rstrip("/"), target_model, settings.llm.reasoning_tokens), **common)
    stack.push_async_callback(target.aclose)
    if (meta_url, settings.optimizer_model) == (target_url, target_model):
        meta = target
    else:
        meta_identity = identity if meta_url == target_url else None
        meta = ChatClient(base_url=meta_url, model=settings.optimizer_model, cache_identity=meta_identity,
                          accepts=Accepts(meta_url.rstrip("/"), settings.optimizer_model, settings.llm.reasoning_tokens),
                          **common)
        stack.push_async_callback(meta.aclose)
    return RunContext(settings, task, meter, limiter, cache, meta, target, progress)


def endpoint_record(context: RunContext) -> dict[str, Any]:
    """What the run learned its endpoints take (``result.json``'s ``endpoint``; the registered
    model's config reads the target's)."""
    return {"target": context.target_llm.accepts.record(), "optimizer": context.meta_llm.accepts.record()}


def make_limiter(llm: LLMSettings) -> PriorityLimiter:
    """The run's one bound on requests in flight: fixed, or adaptive (``--concurrency auto``),
    with the requests and tokens per minute the endpoint allows."""
    adaptive = None
    if llm.adaptive:
        start = min(AUTO_START_CONCURRENCY, llm.max_concurrency)
        adaptive = Adaptive(limit=float(start), maximum=float(llm.max_concurrency))
    rate = RateBudget(llm.rpm, llm.tpm) if llm.rpm or llm.tpm else None
    return PriorityLimiter(llm.max_in_flight, adaptive=adaptive, rate=rate)


class Executor(Protocol):
    """Where scoring runs. Opened before the task is loaded, so slow start-ups overlap it."""

    def evaluator(self, context: RunContext) -> Evaluator: ...

    def callback(self) -> Callback | None:
        """What of the run's events the executor follows, when it opened for this run (to
        wind down early, to record itself); None: nothing."""

    async def aclose(self) -> None: ...


def evaluator_options(context: RunContext) -> dict[str, Any]:
    progress = context.progress
    return dict(
        max_tokens=templates.answer_budget(context.task, context.settings.llm),
        on_request_done=progress.requests_done if progress else None,
        on_requests_planned=progress.requests_planned if progress else None,
    )


class LocalExecutor:
    """Scores in this process: for small runs, notebooks and tests."""

    def evaluator(self, context: RunContext) -> Evaluator:
        return InProcessEvaluator(context.task, context.target_llm, **evaluator_options(context))

    def callback(self) -> Callback | None:
        return None

    async def aclose(self) -> None:
        return None


def open_executor(settings: Settings) -> Executor:
    """The executor the settings name; others than ``local`` are plugins (entry points)."""
    if settings.executor == "local":
        return LocalExecutor()
    for entry in entry_points(group=EXECUTOR_PLUGINS):
        if entry.name == settings.executor:
            return entry.load()(settings)
    raise UserError(
        f"executor {settings.executor!r} is not installed: reinstall the package (pip install -e .) or use --executor local"
    )


def _own(stack: AsyncExitStack, executor: Executor) -> Executor:
    """Closes an executor this run opened (one handed in stays open for its owner)."""
    stack.push_async_callback(executor.aclose)
    return executor


def check_max_cost(settings: Settings) -> None:
    if settings.optimizer.max_cost and not (settings.llm.price_input or settings.llm.price_output):
        raise UserError("--max-cost needs prices: give --price-input and --price-output (USD per 1M tokens)")


async def estimate_for(settings: Settings, context: RunContext, local: LocalServer | None) -> Estimate | None:
    """The run's estimate (``estimate.py``), or None for a method whose calls are its own
    (MLflow's optimizers)."""
    if settings.optimizer.method not in METHODS:
        return None
    identity = local.model.identity if local is not None else None
    task = context.task

    def make_loop(simulated: Settings, meter: UsageMeter, limiter: PriorityLimiter, cache: Any,
                  meta: ChatClient, target: ChatClient) -> Optimizer:
        stand_in = RunContext(simulated, task, meter, limiter, cache, meta, target, None)
        return make_optimizer(simulated, stand_in, LocalExecutor().evaluator(stand_in), [], None)

    return await estimate_run(settings, task, context.cache, identity,
                              (context.target_llm.base_url, context.meta_llm.base_url), make_loop)


def guard_cost(settings: Settings, context: RunContext, estimate: Estimate | None) -> None:
    """``--max-cost``: the clients refuse new calls once the search has spent the budget less
    the test scoring's estimated cost (held back so that the best prompt gets its test score)."""
    budget = settings.optimizer.max_cost
    if not budget:
        return
    spare = estimate.test_cost if estimate is not None else 0.0
    if spare >= budget:
        raise UserError(
            f"--max-cost {budget:g} does not cover the test scoring alone (about ${spare:.4f}): raise --max-cost "
            "or lower --test-size"
        )
    floor = spare + (estimate.initial_cost if estimate is not None else 0.0)
    if floor >= budget:
        raise UserError(
            f"--max-cost {budget:g} does not cover scoring the initial prompt and the test sample (about "
            f"${floor:.4f}), before any candidate: raise --max-cost or lower --train-size"
        )
    guard = CostGuard(context.meter, budget, held_back=spare, spare=(TEST_SCORING,),
                      price_input=settings.llm.price_input)
    context.target_llm.guard = guard
    context.meta_llm.guard = guard


async def dry_run(settings: Settings) -> Estimate | None:
    """``--dry-run``: the data loaded and checked, the endpoints checked, the estimate made;
    no completion request sent."""
    settings = anchor_paths(with_demo_defaults(settings))
    async with AsyncExitStack() as stack:
        settings, local = start_local_llm(settings, stack)
        context = await open_context(settings, stack, None, local=local)
        return await estimate_for(settings, context, local)


def make_optimizer(
    settings: Settings, context: RunContext, evaluator: Evaluator, callbacks: list[Callback], state: RunState | None = None
) -> Optimizer:
    """The loop object of the method the settings name (every front door builds it here)."""
    return Optimizer(
        context.task,
        context.meta_llm,
        evaluator,
        settings.optimizer,
        seed=settings.seed,
        meter=context.meter,
        callbacks=callbacks,
        meta_max_tokens=settings.llm.meta_max_tokens,
        state=state,
        cost_guard=context.meta_llm.guard,  # --max-cost: the same guard on both clients
        method=method_for(settings.optimizer.method),
    )


@dataclass
class ResumePoint:
    """Where a run goes on from: the settings it started with and its last checkpoint (None:
    it was stopped before its first round finished, and starts again from the cache)."""

    settings: Settings
    state: RunState | None


def resume_point(settings: Settings) -> ResumePoint:
    """The run ``settings.resume`` names, from the resume source installed (MLflow's runs)."""
    for entry in entry_points(group=RESUME_SOURCES):
        return entry.load()(settings)
    raise UserError("--resume needs the MLflow integration: reinstall the package (pip install -e .)")


class EndpointRecorder(Callback):
    """Puts what the run learned its endpoints take into the result, before the callbacks
    after it (tracking, registration) read it."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def on_finish(self, result: Any) -> None:
        result.run_records["endpoint"] = endpoint_record(self.context)


class CheckpointWriter(Callback):
    """Saves the run state after every round, so a killed run loses at most the round in progress."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round(self, result: Any) -> None:
        result.state.save(self.path)


async def optimize(
    settings: Settings,
    *,
    callbacks: list[Callback] | None = None,
    progress: ConsoleProgress | None = None,
    executor: Executor | None = None,
    resume: ResumePoint | None = None,
) -> tuple[RunResult, Path]:
    """Runs the optimizer and writes ``result.json``; returns the result and the output folder.
    With ``resume`` the run goes on from that point, with its settings.

    Every callback hears ``on_end`` once, whether the run finished or failed."""
    state = resume.state if resume is not None else None
    settings = anchor_paths(with_demo_defaults(resume.settings if resume is not None else settings))
    folder = output_folder(settings)
    check_output(folder)
    extra = list(callbacks or [])
    succeeded = False
    try:
        async with AsyncExitStack() as stack:
            settings, local = start_local_llm(settings, stack)
            for callback in [*([progress] if progress else []), *extra]:
                callback.on_settings(settings)
            owned = executor is None
            executor = executor or _own(stack, open_executor(settings))
            context = await open_context(settings, stack, progress, local=local)
            estimate = await estimate_for(settings, context, local)
            if estimate is not None:
                for callback in [*([progress] if progress else []), *extra]:
                    notify(callback, "on_estimate", estimate)
            guard_cost(settings, context, estimate)
            for callback in extra:  # per-request observers (tracing), when a callback wants them
                wants = getattr(callback, "wants_llm_calls", None)  # a plugin may not subclass Callback
                if wants() if wants else hasattr(callback, "on_llm_call"):
                    for client in {id(c): c for c in (context.target_llm, context.meta_llm)}.values():
                        client.observers.append(functools.partial(notify, callback, "on_llm_call"))
            everyone: list[Callback] = [
                *([progress] if progress else []),
                CheckpointWriter(folder / "state.json"),
                EndpointRecorder(context),
                # an executor the run opened may follow it too (to wind down early)
                *(follower for follower in [executor.callback() if owned else None] if follower is not None),
                *extra,
            ]
            optimizer = make_optimizer(settings, context, executor.evaluator(context), everyone, state)
            try:
                result = await optimizer.run(settings.optimizer.initial_prompt)
            except BaseException as error:
                keep_what_was_paid_for(optimizer, error, settings, context, estimate, folder)
                raise
            task = context.task
            add_run_records(result, context, estimate)
        write_result(result, settings, task, folder)
        succeeded = result.failure is None
        return result, folder
    finally:
        for callback in extra:
            callback.on_end(succeeded)


def check_output(folder: Path) -> None:
    """Refuses, before the first request, an output folder that cannot be written: the
    folder, or the nearest folder above it that exists (where it would be made), takes a
    file. Nothing is made here: a run stopped by bad data leaves no empty folder behind."""
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=where, prefix=".distillprompt-check-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write result.json to {folder} ({where}: {error.strerror or type(error).__name__}): pass --output "
            "a folder you can write to"
        ) from None


def add_run_records(result: RunResult, context: RunContext, estimate: Estimate | None) -> None:
    """What the run adds to its result beside the loop's: the cache's figures, the estimate."""
    if context.cache is not None:
        result.run_records["cache"] = context.cache.stats()
    if estimate is not None:
        result.run_records["estimate"] = estimate.to_dict()
    result.run_records.setdefault("endpoint", endpoint_record(context))


def write_result(result: RunResult, settings: Settings, task: Task, folder: Path) -> None:
    """``result.json``, ``candidates.csv`` and ``pareto.png`` in the output folder."""
    result.run_records["settings"] = settings.public_dict()
    folder.mkdir(parents=True, exist_ok=True)
    rows = pareto.candidate_rows(result, task, settings.llm.price_input, settings.llm.price_output)
    result.run_records["pareto"] = {"summary": pareto.summary(rows, len(task.train)),
                                    "front": [row["id"] for row in rows if row["on_front"]]}
    (folder / "result.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    pareto.write(rows, folder, f"{task.name}: score against prompt length")


def keep_what_was_paid_for(
    optimizer: Optimizer, error: BaseException, settings: Settings, context: RunContext, estimate: Estimate | None,
    folder: Path,
) -> None:
    """A run that an error (a setting found wrong mid-run, Ctrl-C, a bug) ends after it has
    spent writes ``result.json`` all the same: every candidate so far, the best prompt of the
    finished rounds, the usage, the refusals, with stop reason ``error`` or ``interrupted``
    and the error as ``failure``."""
    usage = context.meter.total()
    if not (usage.requests or usage.cache_hits or usage.failed):
        return  # nothing paid for: the error line is all there is to say
    try:
        result = optimizer.result_so_far(error)
        if result is None:
            return
        add_run_records(result, context, estimate)
        write_result(result, settings, context.task, folder)
    except Exception as failure:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("could not write result.json for the run that stopped (%s: %s)", type(failure).__name__, failure)
        return
    log.warning("the run stopped before its end: what it paid for (%d requests, $%.4f; %d candidates, the best of "
                "the finished rounds as final_prompt) is in %s", usage.requests, usage.cost, len(result.history),
                folder / "result.json")


async def optimize_task(
    settings: Settings,
    task: Task,
    evaluator: Callable[[RunContext], Evaluator],
    initial_prompt: str,
    *,
    callbacks: list[Callback] | None = None,
) -> RunResult:
    """The same loop on a task and a scoring function the caller brings (the door that
    ``mlflow_project.DistillPromptOptimizer`` uses): the method, meta-prompts, hygiene,
    response cache, budgets and events of ``optimize``; the embedded model when no endpoint
    is configured. Nothing is written to disk."""
    settings = anchor_paths(settings)
    check_max_cost(settings)
    async with AsyncExitStack() as stack:
        settings, local = start_local_llm(settings, stack)
        context = await open_context(settings, stack, None, local=local, task=task, with_target=False)
        guard_cost(settings, context, None)  # the optimizer model's calls: the app's own are not ours to price
        return await make_optimizer(settings, context, evaluator(context), list(callbacks or [])).run(initial_prompt)


async def evaluate(
    settings: Settings,
    prompt: str,
    *,
    progress: ConsoleProgress | None = None,
    executor: Executor | None = None,
) -> tuple[Score, Task, dict[str, Any]]:
    """Scores one prompt on the test sample."""
    settings = anchor_paths(with_demo_defaults(settings))
    async with AsyncExitStack() as stack:
        settings, local = start_local_llm(settings, stack)
        executor = executor or _own(stack, open_executor(settings))
        context = await open_context(settings, stack, progress, need_train=False, local=local)
        started = time.perf_counter()
        (score,) = await executor.evaluator(context).score([prompt], context.task.test, stage="test")
        usage = context.meter.total().to_dict()
        usage["wall_time_seconds"] = round(time.perf_counter() - started, 3)
        return score, context.task, usage
