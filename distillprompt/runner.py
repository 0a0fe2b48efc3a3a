"""Wires one run together: a ``RunPlan`` (``resolution.py``: the final settings) → task → LLM
clients → evaluator → optimizer → the output folder (``output.py``).

The CLI and the MLflow entry points both call these functions; they add their own
callbacks (progress display, tracking) and executors (Ray), nothing else. Each takes the
settings as given, resolved here once, or a plan resolved already (the CLI resolves first, so
that the callbacks it makes read the final settings).
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable

from .context import RunContext, checked_task, endpoint_record, endpoints, open_cache, open_clients, open_context
from .cost import CostCap, Estimate, cost_cap, estimate, require_prices
from .data import Task
from .engine import Callback, Optimizer, RunResult, notify
from .evaluation import Evaluator, Score
from .executors import Executor, LocalExecutor, open_executor
from .llm import UsageMeter
from .local_llm import LocalServer
from .methods import METHODS, method_for
from .output import RunFolder, check_output, output_folder, write_result
from .progress import ConsoleProgress
from .resolution import RunPlan, resolve
from .settings import Settings
from .state import RunState

log = logging.getLogger(__name__)


def planned(run: Settings | RunPlan) -> RunPlan:
    """A plan resolved already, or the given settings resolved (no resume)."""
    return run if isinstance(run, RunPlan) else resolve(run)


def make_optimizer(
    settings: Settings, context: RunContext, evaluator: Evaluator, callbacks: list[Callback],
    state: RunState | None = None, cap: CostCap | None = None,
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
        cost_cap=cap,
        method=method_for(settings.optimizer.method),
    )


async def estimate_for(settings: Settings, task: Task, cache: Any, server: LocalServer | None) -> Estimate | None:
    """The run's estimate (``cost.estimate``: the run's loop replayed, nothing sent), or None for
    a method whose calls are its own (MLflow's optimizers)."""
    if settings.optimizer.method not in METHODS:
        return None
    identity = server.model.identity if server is not None else None
    (target_url, _), (meta_url, _) = endpoints(settings)

    def replay(simulated: Settings, meter: UsageMeter, limiter: Any, replies: Any, meta: Any, target: Any) -> Optimizer:
        stand_in = RunContext(simulated, task, meter, limiter, replies, meta, target, None)
        return make_optimizer(simulated, stand_in, LocalExecutor().evaluator(stand_in), [])

    return await estimate(settings, task, cache, identity, (target_url, meta_url), replay)


async def dry_run(run: Settings | RunPlan) -> Estimate | None:
    """``--dry-run``: the data loaded and checked, the endpoints checked, the estimate made;
    no completion request sent."""
    plan = planned(run)
    settings = plan.settings
    async with AsyncExitStack() as stack:
        if plan.server is not None:
            stack.enter_context(plan.server)
        task = await checked_task(settings, plan.server)
        return await estimate_for(settings, task, open_cache(settings, stack), plan.server)


class EndpointRecorder(Callback):
    """Puts what the run learned its endpoints take into the result, before the callbacks
    after it (tracking, registration) read it."""

    def __init__(self, context: RunContext) -> None:
        self.context = context

    def on_finish(self, result: Any) -> None:
        result.records.endpoint = endpoint_record(self.context)


def observe_calls(context: RunContext, callbacks: list[Callback]) -> None:
    """Per-request observers (tracing): every callback that wants each answered call hears it."""
    for callback in callbacks:
        wants = getattr(callback, "wants_llm_calls", None)  # a plugin may not subclass Callback
        if wants() if wants else hasattr(callback, "on_llm_call"):
            for client in {id(c): c for c in (context.target_llm, context.meta_llm)}.values():
                client.observers.append(functools.partial(notify, callback, "on_llm_call"))


async def optimize(
    run: Settings | RunPlan,
    *,
    callbacks: list[Callback] | None = None,
    progress: ConsoleProgress | None = None,
    executor: Executor | None = None,
) -> tuple[RunResult, Path]:
    """Runs the optimizer and writes ``result.json``; returns the result and the output folder.
    A plan with a checkpoint (``--resume``) goes on from it.

    Every callback hears ``on_end`` once, whether the run finished or failed."""
    extra = list(callbacks or [])
    succeeded = False
    try:
        plan = planned(run)
        folder = output_folder(plan.settings)
        check_output(folder)
        async with AsyncExitStack() as stack:
            result, task = await _optimize(plan, folder, stack, extra, progress, executor)
        write_result(result, plan.settings, task, folder)
        succeeded = result.failure is None
        return result, folder
    finally:
        for callback in extra:
            callback.on_end(succeeded)


async def _optimize(
    plan: RunPlan, folder: Path, stack: AsyncExitStack, extra: list[Callback], progress: ConsoleProgress | None,
    executor: Executor | None,
) -> tuple[RunResult, Task]:
    settings = plan.settings
    if plan.server is not None:
        stack.enter_context(plan.server)
    listeners = [*([progress] if progress else []), *extra]
    for callback in listeners:
        callback.on_settings(settings)
    follower = None
    if executor is None:  # one the run opens is closed with it, and may follow it (to wind down early)
        executor = open_executor(settings)
        stack.push_async_callback(executor.aclose)
        follower = executor.callback()
    task = await checked_task(settings, plan.server)
    cache = open_cache(settings, stack)
    forecast = await estimate_for(settings, task, cache, plan.server)
    if forecast is not None:
        for callback in listeners:
            notify(callback, "on_estimate", forecast)
    meter = UsageMeter()
    cap = cost_cap(settings, meter, forecast)
    context = open_clients(settings, stack, task, cache, meter, plan.server, progress, cost_cap=cap)
    observe_calls(context, extra)
    heard_by: list[Callback] = [
        *([progress] if progress else []), RunFolder(folder, settings), EndpointRecorder(context),
        *([follower] if follower is not None else []), *extra,
    ]
    optimizer = make_optimizer(settings, context, executor.evaluator(context), heard_by, plan.state, cap)
    try:
        result = await optimizer.run(settings.optimizer.initial_prompt)
    except BaseException as error:
        keep_what_was_paid_for(optimizer, error, settings, context, forecast, folder)
        raise
    add_records(result, context, forecast)
    return result, task


def add_records(result: RunResult, context: RunContext, forecast: Estimate | None) -> None:
    """What the run adds to its result beside the loop's: the cache's figures, the estimate."""
    if context.cache is not None:
        result.records.cache = context.cache.stats()
    if forecast is not None:
        result.records.estimate = forecast.to_dict()
    if not result.records.endpoint:
        result.records.endpoint = endpoint_record(context)


def keep_what_was_paid_for(
    optimizer: Optimizer, error: BaseException, settings: Settings, context: RunContext, forecast: Estimate | None,
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
        add_records(result, context, forecast)
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
    require_prices(settings)
    plan = resolve(settings, loads_task=False)
    settings = plan.settings
    async with AsyncExitStack() as stack:
        if plan.server is not None:
            stack.enter_context(plan.server)
        task = await checked_task(settings, plan.server, task=task, with_target=False)
        meter = UsageMeter()
        cap = cost_cap(settings, meter, None)  # the optimizer model's calls: the app's own are not ours to price
        context = open_clients(settings, stack, task, open_cache(settings, stack), meter, plan.server,
                               with_target=False, cost_cap=cap)
        loop = make_optimizer(settings, context, evaluator(context), list(callbacks or []), cap=cap)
        return await loop.run(initial_prompt)


async def evaluate(
    run: Settings | RunPlan,
    prompt: str,
    *,
    progress: ConsoleProgress | None = None,
    executor: Executor | None = None,
) -> tuple[Score, Task, dict[str, Any]]:
    """Scores one prompt on the test sample."""
    plan = planned(run)
    settings = plan.settings
    async with AsyncExitStack() as stack:
        if plan.server is not None:
            stack.enter_context(plan.server)
        if executor is None:
            executor = open_executor(settings)
            stack.push_async_callback(executor.aclose)
        context = await open_context(settings, stack, progress, need_train=False, server=plan.server)
        started = time.perf_counter()
        (score,) = await executor.evaluator(context).score([prompt], context.task.test, stage="test")
        usage = context.meter.total().to_dict()
        usage["wall_time_seconds"] = round(time.perf_counter() - started, 3)
        return score, context.task, usage
