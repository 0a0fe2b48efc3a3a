"""The ``LLM`` protocol and ``ChatClient``, its implementation over one endpoint and model.

``ChatClient.complete`` looks the request up in the response cache, waits for a slot under
the run's one bound on requests in flight, retries what is worth retrying (``retry.py``),
sends again as the endpoint takes it a request refused for a parameter the model does not
take, raises ``RequestRefused`` for one refused for what it holds (``refusals.py``), turns
any other failure into a one-line ``UserError``, and counts requests, cache hits, tokens
and cost per stage (``ReplyRecorder``).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Callable, Protocol

from ..cache import CachedReply, ResponseCache, request_key
from ..urls import masked
from .limits import META, PriorityLimiter
from .refusals import Accepts, RequestRefused
from .requester import Requester, Send, SpendingCheck, Transport, sampling_seed
from .retry import Retries
from .transport import Endpoint, Reply
from .usage import LLMCall, Messages, Prices, Usage, UsageMeter



class LLM(Protocol):
    """What the loop and the evaluators use of a model: one request's replies, a stage's
    worth of single replies, the model's name and the run's limiter."""

    model: str
    limiter: PriorityLimiter

    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int = 1,
        max_tokens: int,
        stage: str = "",
        salt: int | str = 0,
        priority: int = META,
        stop: tuple[str, ...] = (),
    ) -> list[str]: ...

    async def complete_many(
        self,
        requests: list[Messages],
        *,
        temperature: float,
        max_tokens: int,
        stage: str = "",
        priority: int = META,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
        on_done: Callable[[int], None] | None = None,
        on_refused: Callable[[int, str], None] | None = None,
    ) -> list[str]: ...


class ReplyRecorder:
    """Where replies are looked up and recorded: the response cache (keyed by the whole
    request and, for the endpoint, ``identity``), the usage meter and the per-call observers."""

    def __init__(self, identity: str, model: str, meter: UsageMeter, cache: ResponseCache | None,
                 prices: Prices = Prices()) -> None:
        self.identity = identity
        self.model = model
        self.meter = meter
        self.cache = cache
        self.prices = prices  # what a reply's tokens cost (for the cache's replies: --max-cost counts them)
        self.observers: list[Callable[[LLMCall], None]] = []

    def key(
        self, messages: Messages, *, temperature: float, max_tokens: int, n: int, salt: int | str,
        stop: tuple[str, ...] = (), seed: int | None = None,
    ) -> str:
        return request_key(
            endpoint=self.identity, model=self.model, messages=messages, temperature=temperature,
            max_tokens=max_tokens, n=n, salt=salt, stop=stop, seed=seed,
        )

    def lookup(self, key: str, stage: str) -> list[str] | None:
        """The cached reply of a request, counted as a hit, or None."""
        if self.cache is None:
            return None
        cached = self.cache.get(key)
        if cached is None:
            return None
        self.meter.record(stage, self._hits([cached]))
        return list(cached.texts)

    def lookup_many(self, keys: list[str], stage: str) -> dict[str, CachedReply]:
        """The cached replies among ``keys``, in one query, counted as hits."""
        found = self.cache.get_many(keys) if self.cache is not None else {}
        if found:
            self.meter.record(stage, self._hits([found[key] for key in keys if key in found]))
        return found

    def _hits(self, replies: list[CachedReply]) -> Usage:
        """What cached replies count for: hits, their tokens (in and out, as first paid) and
        what they cost at today's prices (``--max-cost`` counts them)."""
        return Usage(
            cache_hits=len(replies),
            cached_tokens=sum(r.input_tokens + r.output_tokens for r in replies),
            cached_output_tokens=sum(r.output_tokens for r in replies),
            cached_cost=sum(self.prices.cost(r.input_tokens, r.output_tokens) for r in replies),
        )

    def store(
        self, key: str, texts: list[str], spent: Usage, stage: str, messages: Messages | None = None, started: float = 0.0
    ) -> None:
        """Counts what a reply cost, keeps it for the next identical request, and tells the
        observers (per-request tracing) about it."""
        spent.answered += 1
        self.meter.record(stage, spent)
        if self.cache is not None:
            self.cache.put(key, CachedReply(texts, spent.input_tokens, spent.output_tokens))
        if self.observers:
            call = LLMCall(stage, self.model, messages or [], texts, spent, started or time.time(), time.time())
            for observe in self.observers:
                observe(call)


class ChatClient:
    """The LLM protocol over one OpenAI-compatible endpoint and model."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        limiter: PriorityLimiter,
        meter: UsageMeter,
        cache: ResponseCache | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        n_mode: str = "auto",
        prices: Prices = Prices(),
        seed: int | None = None,
        cache_identity: str | None = None,
        accepts: Accepts | None = None,
        reasoning_room: int = 0,
        cost_cap: SpendingCheck | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.base_url = masked(base_url.rstrip("/"))  # shown, and the cache's key: credentials change, the endpoint not
        self.model = model
        self.limiter = limiter
        self.meter = meter
        # the cache keys on ``cache_identity`` instead of the URL for endpoints whose URL
        # changes from run to run while the model behind it does not (a local server on a free port)
        self.recorder = ReplyRecorder(cache_identity or self.base_url, model, meter, cache, prices)
        # what the endpoint takes (learned from its refusals): shared by the run's clients of this endpoint and model
        self.accepts = accepts or Accepts(self.base_url, model, reasoning_room)
        self.seed = seed
        self.cost_cap = cost_cap  # --max-cost: asked before every call, the cache's too
        self.requester = Requester(
            self.base_url, model, transport or Endpoint(base_url, api_key, timeout), limiter,
            Retries(max_retries, backoff_base, backoff_max, random.Random()), self.accepts, n_mode, prices, seed,
            cost_cap,
        )

    @property
    def cache(self) -> ResponseCache | None:
        return self.recorder.cache

    @property
    def observers(self) -> list[Callable[[LLMCall], None]]:
        """Callables told about every answered call (per-request tracing)."""
        return self.recorder.observers

    async def aclose(self) -> None:
        await self.requester.transport.close()

    async def post(self, arguments: dict[str, Any]) -> Reply:
        """One attempt at a chat completion from this process (no cache, limiter or retry)."""
        return await self.requester.transport.post_chat(arguments)

    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int = 1,
        max_tokens: int,
        stage: str = "",
        salt: int | str = 0,
        priority: int = META,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
    ) -> list[str]:
        """The cached reply, else the endpoint's. ``salt`` tells apart requests that are
        otherwise identical (several takes on one meta-prompt) in the cache and in the seed;
        ``send`` makes each attempt elsewhere (``fetch_and_store``)."""
        if self.cost_cap is not None:
            self.cost_cap.check(stage)
        key = self.recorder.key(messages, temperature=temperature, max_tokens=max_tokens, n=n, salt=salt, stop=stop,
                            seed=sampling_seed(self.seed, temperature, salt))
        cached = self.recorder.lookup(key, stage)
        if cached is not None:
            return cached
        return await self.fetch_and_store(
            key, messages, temperature=temperature, n=n, max_tokens=max_tokens, stage=stage, salt=salt,
            priority=priority, stop=stop, send=send,
        )

    async def complete_many(
        self,
        requests: list[Messages],
        *,
        temperature: float,
        max_tokens: int,
        stage: str = "",
        priority: int = META,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
        on_done: Callable[[int], None] | None = None,
        on_refused: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """One reply each (n=1, no salt) to a stage's worth of requests: the cache is asked
        once for all of them, and only the misses go to the endpoint, at once under the
        limiter. ``on_done`` hears of every request answered (cached ones in one call).
        With ``on_refused``, a request the endpoint refuses for what it holds gets an empty
        reply, and ``on_refused`` hears its position and the reason (without it, the
        ``RequestRefused`` is raised)."""
        if self.cost_cap is not None:
            self.cost_cap.check(stage)
        if self.recorder.cache is None:  # no keys to compute
            keys = [str(i) for i in range(len(requests))]
            found: dict[str, CachedReply] = {}
        else:
            seed = sampling_seed(self.seed, temperature, 0)
            keys = [self.recorder.key(messages, temperature=temperature, max_tokens=max_tokens, n=1, salt=0, stop=stop,
                                  seed=seed) for messages in requests]
            found = self.recorder.lookup_many(keys, stage)
        if found and on_done:
            on_done(sum(key in found for key in keys))

        async def miss(index: int, key: str, messages: Messages) -> str:
            try:
                texts = await self.fetch_and_store(
                    key, messages, temperature=temperature, n=1, max_tokens=max_tokens, stage=stage, salt=0,
                    priority=priority, stop=stop, send=send,
                )
            except RequestRefused as refusal:
                if on_refused is None:
                    raise
                on_refused(index, refusal.reason)  # not cached: asked again, it is refused again, for nothing
                texts = []
            if on_done:
                on_done(1)
            return texts[0] if texts else ""

        misses = [(i, key, messages) for i, (key, messages) in enumerate(zip(keys, requests)) if key not in found]
        replies = [(found[key].texts or [""])[0] if key in found else "" for key in keys]
        answered = await asyncio.gather(*(miss(i, key, messages) for i, key, messages in misses))
        for (i, _, _), text in zip(misses, answered):
            replies[i] = text
        return replies

    async def fetch_and_store(
        self,
        key: str,
        messages: Messages,
        *,
        temperature: float,
        n: int,
        max_tokens: int,
        stage: str,
        salt: int | str,
        priority: int,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
    ) -> list[str]:
        """A cache miss: asks the endpoint (``Requester``), counts what it cost (failures too)
        and caches it. ``send`` makes each attempt elsewhere (a Ray actor) under this client's
        limiter, retry rules and accounting."""
        spent = Usage()
        started = time.time()
        try:
            texts = await self.requester.fetch(
                messages, temperature=temperature, n=n, max_tokens=max_tokens, salt=salt, priority=priority,
                spent=spent, stop=stop, send=send, stage=stage,
            )
        except BaseException:
            self.meter.record(stage, spent)
            raise
        self.recorder.store(key, texts, spent, stage, messages, started)
        return texts
