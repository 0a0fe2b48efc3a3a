"""What a run shares once it is open (``RunContext``): the task, the response cache, the usage
meter, the one bound on requests in flight, and the clients of the target model and of the
optimizer model."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from .cache import ResponseCache
from .cost import CostCap, prices_of
from .data import Task, load_task
from .errors import UserError
from .llm import Accepts, Adaptive, ChatClient, PriorityLimiter, RateBudget, UsageMeter, check_endpoint
from .local_llm import LocalServer
from .progress import ConsoleProgress
from .settings import AUTO_START_CONCURRENCY, LLMSettings, Settings
from .urls import request_parts

log = logging.getLogger(__name__)


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


def client_options(settings: Settings) -> dict[str, Any]:
    """The endpoint options every ChatClient of a run shares (the driver's and Ray actors')."""
    llm = settings.llm
    return dict(
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        timeout=llm.timeout,
        max_retries=llm.max_retries,
        backoff_base=llm.backoff_base,
        backoff_max=llm.backoff_max,
        prices=prices_of(llm),
        reasoning_room=llm.reasoning_tokens,
    )


def make_limiter(llm: LLMSettings) -> PriorityLimiter:
    """The run's one bound on requests in flight: fixed, or adaptive (``--concurrency auto``),
    with the requests and tokens per minute the endpoint allows."""
    adaptive = None
    if llm.adaptive:
        start = min(AUTO_START_CONCURRENCY, llm.max_concurrency)
        adaptive = Adaptive(limit=float(start), maximum=float(llm.max_concurrency))
    rate = RateBudget(llm.rpm, llm.tpm) if llm.rpm or llm.tpm else None
    return PriorityLimiter(llm.max_in_flight, adaptive=adaptive, rate=rate)


def _require_endpoint(url: str | None) -> str:
    if not url:
        raise UserError(
            "no LLM endpoint configured: pass --base-url (or set OPENAI_BASE_URL) to an OpenAI-compatible API"
        )
    return url


def endpoints(settings: Settings, with_target: bool = True) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (URL, model) of the target and of the optimizer model. ``with_target=False``: the
    caller scores prompts its own way (``optimize_task``), and the optimizer model stands in
    as the target."""
    meta = (_require_endpoint(settings.optimizer_base_url), settings.optimizer_model)
    return ((_require_endpoint(settings.llm.base_url), settings.llm.model) if with_target else meta), meta


async def checked_task(
    settings: Settings, server: LocalServer | None, *, need_train: bool = True, task: Task | None = None,
    with_target: bool = True,
) -> Task:
    """Loads the task (unless one is given) while the embedded server comes up and the
    endpoints are checked; a data error is reported first, as when one came after the other."""
    target, meta = endpoints(settings, with_target)
    api_key = settings.llm.api_key.get_secret_value() if settings.llm.api_key else None
    if api_key and any(request_parts(url).authorization for url in {target[0], meta[0]}):
        log.warning("an endpoint URL carries a user and password: they go as HTTP basic auth, in the Authorization "
                    "header, and the API key is not sent to that endpoint")

    async def check() -> None:
        if server is not None:
            await asyncio.to_thread(server.wait_ready)
        try:
            await asyncio.gather(*(check_endpoint(url, api_key, model) for url, model in {target, meta}))
        except UserError as error:
            if not (settings.resume and settings.cache.enabled):
                raise
            # a --resume that completes an MLflow record is answered by the cache: the
            # endpoint may be down by then, or its key not in this environment
            log.warning("%s; --resume goes on from the response cache, and a request it does not hold will fail",
                        error)

    loading = asyncio.to_thread(
        load_task, settings.data, settings.seed, need_train=need_train, context_tokens=settings.llm.known_context
    ) if task is None else None
    loaded, checked = await asyncio.gather(loading or asyncio.sleep(0, task), check(), return_exceptions=True)
    for outcome in (loaded, checked):
        if isinstance(outcome, BaseException):
            raise outcome
    return loaded


def open_cache(settings: Settings, stack: AsyncExitStack) -> ResponseCache | None:
    """The response cache (None with ``--no-cache``), closed with the run."""
    if not settings.cache.enabled:
        return None
    cache = ResponseCache(settings.cache.path)
    stack.callback(cache.close)
    return cache


def open_clients(
    settings: Settings, stack: AsyncExitStack, task: Task, cache: ResponseCache | None, meter: UsageMeter,
    server: LocalServer | None, progress: ConsoleProgress | None = None, *, with_target: bool = True,
    cost_cap: CostCap | None = None,
) -> RunContext:
    """The run's clients, under one limiter, one meter and the ``--max-cost`` cap; what the
    target's endpoint takes (learned from its refusals) holds for the whole run."""
    (target_url, target_model), (meta_url, meta_model) = endpoints(settings, with_target)
    limiter = make_limiter(settings.llm)
    common = dict(client_options(settings), limiter=limiter, meter=meter, cache=cache, n_mode=settings.llm.n_mode,
                  seed=settings.seed, cost_cap=cost_cap)
    identity = server.model.identity if server is not None else None
    room = settings.llm.reasoning_tokens
    target = ChatClient(base_url=target_url, model=target_model, cache_identity=identity,
                        accepts=Accepts(target_url.rstrip("/"), target_model, room), **common)
    stack.push_async_callback(target.aclose)
    meta = target
    if (meta_url, meta_model) != (target_url, target_model):
        meta = ChatClient(base_url=meta_url, model=meta_model,
                          cache_identity=identity if meta_url == target_url else None,
                          accepts=Accepts(meta_url.rstrip("/"), meta_model, room), **common)
        stack.push_async_callback(meta.aclose)
    return RunContext(settings, task, meter, limiter, cache, meta, target, progress)


async def open_context(
    settings: Settings, stack: AsyncExitStack, progress: ConsoleProgress | None = None, *, need_train: bool = True,
    server: LocalServer | None = None, task: Task | None = None, with_target: bool = True,
) -> RunContext:
    """The task loaded and checked, the endpoints checked, the cache and the clients open (no
    ``--max-cost`` cap: ``runner.optimize`` opens its context in steps, to estimate first)."""
    task = await checked_task(settings, server, need_train=need_train, task=task, with_target=with_target)
    return open_clients(settings, stack, task, open_cache(settings, stack), UsageMeter(), server, progress,
                        with_target=with_target)


def endpoint_record(context: RunContext) -> dict[str, Any]:
    """What the run learned its endpoints take (``result.json``'s ``endpoint``; the registered
    model's config reads the target's)."""
    return {"target": context.target_llm.accepts.record(), "optimizer": context.meta_llm.accepts.record()}
