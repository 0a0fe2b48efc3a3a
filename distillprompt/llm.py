"""The only code that talks to an OpenAI-compatible endpoint.

``ChatClient.complete`` is the ``LLM`` protocol of the design: it looks the request up in
the response cache, waits for a slot under the one global bound on requests in flight,
retries what is worth retrying (429, 5xx, timeouts, lost connections) with exponential
backoff and jitter while honouring ``Retry-After``, turns what is not (400, 401, 403, 404)
into a one-line ``UserError``, and counts requests, cache hits, tokens and cost per stage.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import itertools
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from .cache import CachedReply, ResponseCache, request_key
from .errors import EndpointUnavailable, UserError

Messages = list[dict[str, str]]

# Priorities of the request limiter: lower goes first.
META = 0
SCORING = 1

# Scoring requests that ask several samples share one seed space with meta-prompts.
_RETRYABLE = (
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
)


class LLM(Protocol):
    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int = 1,
        max_tokens: int,
        stage: str = "",
        sample: int | str = 0,
        priority: int = META,
        stop: tuple[str, ...] = (),
    ) -> list[str]: ...


@dataclass
class Usage:
    """What a set of LLM calls cost. ``requests`` counts calls that reached the endpoint."""

    requests: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    retries: int = 0
    failed: int = 0
    cached_tokens: int = 0  # tokens of the replies the cache served (not paid again)
    answered: int = 0  # calls the endpoint answered (one call asking n samples may take n requests)

    @property
    def calls(self) -> int:
        """Logical calls, whether the cache or the endpoint answered them: the same count on a
        rerun from the cache, whatever the endpoint's handling of n."""
        return self.answered + self.cache_hits

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def minus(self, other: Usage) -> Usage:
        return Usage(**{name: value - getattr(other, name) for name, value in asdict(self).items()})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calls": self.calls, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


@dataclass
class UsageMeter:
    """Usage summed per stage (``rewrite``, ``scoring`` …) over the whole run."""

    by_stage: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))

    def record(self, stage: str, usage: Usage) -> None:
        self.by_stage[stage].add(usage)

    def total(self) -> Usage:
        total = Usage()
        for usage in self.by_stage.values():
            total.add(usage)
        return total

    def snapshot(self) -> dict[str, Usage]:
        return {stage: Usage(**asdict(usage)) for stage, usage in self.by_stage.items()}

    @staticmethod
    def since(now: dict[str, Usage], before: dict[str, Usage]) -> dict[str, Usage]:
        return {stage: usage.minus(before.get(stage, Usage())) for stage, usage in now.items()}


@dataclass(frozen=True)
class LLMCall:
    """One answered request, for observers such as per-request tracing (never the key)."""

    stage: str
    model: str
    messages: Messages
    texts: list[str]
    usage: Usage
    started: float
    ended: float


class PriorityLimiter:
    """A semaphore whose waiters are served by priority, then in arrival order.

    One instance bounds every request in flight in the run; meta-prompts (priority 0)
    overtake queued scoring requests (priority 1), so the chain of meta-prompts that the
    run must wait for is never stuck behind a round of scoring.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def in_flight(self) -> int:
        return self.capacity - self._free

    async def acquire(self, priority: int = META) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


def retry_delay(error: Exception, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): Retry-After if the endpoint gave one."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(max(float(value) * scale, 0.0), 300.0)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if name == "retry-after" else None
            if parsed is not None:
                return min(max(parsed.timestamp() - time.time(), 0.0), 300.0)
    exponential = min(cap, base * (2**attempt))
    return exponential * (0.5 + rng.random() / 2)


def _status_error(error: openai.APIStatusError, base_url: str, model: str) -> UserError:
    detail = _error_detail(error)
    status = error.status_code
    if status == 401:
        return UserError(
            f"the endpoint {base_url} rejected the API key (401{detail}): set OPENAI_API_KEY (or --api-key) to a valid key"
        )
    if status == 403:
        return UserError(
            f"the endpoint {base_url} refused access to model {model!r} (403{detail}): use a key with access to it or another --model"
        )
    if status == 404:
        return UserError(
            f"the endpoint {base_url} answered 404 for model {model!r}{detail}: check --model, and that --base-url is an "
            "OpenAI-compatible API root (usually ending in /v1)"
        )
    return UserError(f"the endpoint {base_url} refused the request ({status}{detail}): check --model and the endpoint's limits")


def _error_detail(error: openai.APIStatusError) -> str:
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    text = " ".join(str(message or "").split())[:200]
    return f": {text}" if text else ""


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
        price_input: float = 0.0,
        price_output: float = 0.0,
        seed: int | None = None,
        cache_identity: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # What the cache keys on instead of the URL, for endpoints whose URL changes from run
        # to run while the model behind it does not (a local server on a free port).
        self.cache_identity = cache_identity or self.base_url
        self.model = model
        self.limiter = limiter
        self.meter = meter
        self.cache = cache
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.n_mode = n_mode
        self.native_n: bool | None = {"native": True, "separate": False}.get(n_mode)
        self.price_input = price_input
        self.price_output = price_output
        self.seed = seed
        self._jitter = random.Random()
        self.observers: list[Callable[[LLMCall], None]] = []
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key or "not-needed", max_retries=0, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.close()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price_input + output_tokens * self.price_output) / 1_000_000

    def cache_key(
        self, messages: Messages, *, temperature: float, max_tokens: int, n: int, sample: int | str, stop: tuple[str, ...] = ()
    ) -> str:
        return request_key(
            endpoint=self.cache_identity,
            model=self.model,
            messages=messages,
            temperature=temperature,
            max_tokens=max_tokens,
            n=n,
            sample=sample,
            stop=stop,
        )

    def lookup(self, key: str, stage: str) -> list[str] | None:
        """The cached reply of a request, counted as a hit, or None."""
        if self.cache is None:
            return None
        cached = self.cache.get(key)
        if cached is None:
            return None
        self.meter.record(stage, Usage(cache_hits=1, cached_tokens=cached.input_tokens + cached.output_tokens))
        return list(cached.texts)

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

    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int = 1,
        max_tokens: int,
        stage: str = "",
        sample: int | str = 0,
        priority: int = META,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        key = self.cache_key(messages, temperature=temperature, max_tokens=max_tokens, n=n, sample=sample, stop=stop)
        cached = self.lookup(key, stage)
        if cached is not None:
            return cached
        return await self.fetch_and_store(
            key, messages, temperature=temperature, n=n, max_tokens=max_tokens, stage=stage, sample=sample,
            priority=priority, stop=stop,
        )

    async def fetch_and_store(
        self,
        key: str,
        messages: Messages,
        *,
        temperature: float,
        n: int,
        max_tokens: int,
        stage: str,
        sample: int | str,
        priority: int,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        """A cache miss: asks the endpoint, counts what it cost (failures too) and caches it."""
        spent = Usage()
        started = time.time()
        try:
            texts = await self.fetch(
                messages, temperature=temperature, n=n, max_tokens=max_tokens, sample=sample, priority=priority,
                spent=spent, stop=stop,
            )
        except BaseException:
            self.meter.record(stage, spent)
            raise
        self.store(key, texts, spent, stage, messages, started)
        return texts

    async def fetch(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int,
        max_tokens: int,
        sample: int | str,
        priority: int,
        spent: Usage,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        """Asks the endpoint (no cache): n samples, retried as the rules say; adds what it
        cost, retries and failures included, to ``spent``."""
        seed = self._request_seed(sample) if temperature > 0 else None
        if n == 1 or self.native_n is False:
            replies = await asyncio.gather(
                *(self._request(messages, temperature, 1, max_tokens, priority, _offset(seed, i), spent, stop) for i in range(n))
            )
        else:
            first = await self._request(messages, temperature, n, max_tokens, priority, seed, spent, stop)
            replies = [first]
            if len(first) < n:
                if self.native_n is True:
                    raise UserError(
                        f"the endpoint {self.base_url} returned {len(first)} of {n} samples: use --n-mode separate or auto"
                    )
                self.native_n = False
                replies += await asyncio.gather(
                    *(
                        self._request(messages, temperature, 1, max_tokens, priority, _offset(seed, i), spent, stop)
                        for i in range(len(first), n)
                    )
                )
            elif self.native_n is None:
                self.native_n = True
        return [text for reply in replies for text in reply][:n]

    def _request_seed(self, sample: int | str) -> int | None:
        if self.seed is None:
            return None
        digest = request_key(endpoint="", model="", messages=[], temperature=0, max_tokens=0, n=0, sample=f"{self.seed}:{sample}")
        return int(digest[:8], 16)

    async def _request(
        self,
        messages: Messages,
        temperature: float,
        n: int,
        max_tokens: int,
        priority: int,
        seed: int | None,
        spent: Usage,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        arguments: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if n > 1:
            arguments["n"] = n
        if seed is not None:
            arguments["seed"] = seed
        if stop:
            arguments["stop"] = list(stop)
        def retryable(error: BaseException) -> bool:
            if isinstance(error, _RETRYABLE):
                return True
            return isinstance(error, openai.APIStatusError) and (
                error.status_code >= 500 or error.status_code in (408, 409, 425)
            )

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return retry_delay(error, state.attempt_number - 1, self.backoff_base, self.backoff_max, self._jitter)

        def count_retry(state: RetryCallState) -> None:
            spent.retries += 1

        async def attempt() -> Any:
            await self.limiter.acquire(priority)
            try:
                return await self._client.chat.completions.create(**arguments)
            finally:
                self.limiter.release()  # the slot is free while the retry waits

        # tenacity runs the retry loop; the rules are ours: which errors, how long to wait
        # (Retry-After first, else exponential backoff with jitter), how many times.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(retryable),
            before_sleep=count_retry,
            reraise=True,
        )
        try:
            response = await retrying(attempt)
        except openai.APIStatusError as error:
            spent.failed += 1
            if not retryable(error):
                raise _status_error(error, self.base_url, self.model) from None
            raise EndpointUnavailable(
                f"{self.base_url} kept failing after {self.max_retries} retries ({_describe_error(error)})"
            ) from None
        except _RETRYABLE as error:
            spent.failed += 1
            raise EndpointUnavailable(
                f"{self.base_url} kept failing after {self.max_retries} retries ({_describe_error(error)})"
            ) from None
        return self._read(response, spent)

    def _read(self, response: Any, spent: Usage) -> list[str]:
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):
            raise UserError(
                f"the endpoint {self.base_url} did not answer like an OpenAI-compatible API: "
                "point --base-url at the API root (usually ending in /v1)"
            )
        texts = [(getattr(choice.message, "content", None) or "") for choice in choices if choice is not None]
        usage = getattr(response, "usage", None)
        input_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        spent.requests += 1
        spent.input_tokens += input_tokens
        spent.output_tokens += output_tokens
        spent.cost += self.cost(input_tokens, output_tokens)
        return texts


def _offset(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % (2**31)


def _describe_error(error: Exception | None) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"last error: HTTP {error.status_code}"
    if error is None:
        return "no attempt made"
    return f"last error: {type(error).__name__}"


async def check_endpoint(base_url: str, api_key: str | None, model: str, timeout: float = 10.0) -> None:
    """Fails fast, with the fix in one line, when the endpoint is unreachable, rejects the key
    or does not serve the model. Endpoints without a model list are let through."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=0, timeout=timeout)
    try:
        page = await client.models.list()
        served = [item.id for item in page.data]
    except (openai.APIConnectionError, openai.APITimeoutError):
        raise UserError(
            f"cannot reach the endpoint {base_url}: start the server or fix --base-url (or OPENAI_BASE_URL)"
        ) from None
    except openai.APIStatusError as error:
        if error.status_code in (401, 403):
            raise _status_error(error, base_url, model) from None
        return  # no /models route: the first real request will tell
    except Exception:
        raise UserError(
            f"the endpoint {base_url} did not answer like an OpenAI-compatible API: point --base-url at the API root "
            "(usually ending in /v1)"
        ) from None
    finally:
        await client.close()
    if served and not any(name == model or name.split(":")[0] == model for name in served):
        shown = ", ".join(served[:10]) + (" …" if len(served) > 10 else "")
        raise UserError(f"the endpoint {base_url} does not serve model {model!r}: pass --model with one of {shown}")
