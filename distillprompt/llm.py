"""The optimizer's only code that talks to an OpenAI-compatible endpoint.

``ChatClient.complete`` is the ``LLM`` protocol of the design: it looks the request up in
the response cache, waits for a slot under the one global bound on requests in flight,
retries what is worth retrying (429, 5xx, timeouts, lost connections) with exponential
backoff and jitter while honouring ``Retry-After``, turns what is not (400, 401, 403, 404)
into a one-line ``UserError``, and counts requests, cache hits, tokens and cost per stage.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import heapq
import itertools
import json
import random
import ssl
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Awaitable, Callable, Protocol

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from .cache import CachedReply, ResponseCache, request_key
from .errors import EndpointUnavailable, UserError

Messages = list[dict[str, str]]
# one attempt made elsewhere: the request's arguments in, a Reply out (or AttemptFailed)
Send = Callable[[dict[str, Any]], Awaitable["Reply"]]

# Priorities of the request limiter: lower goes first.
META = 0
SCORING = 1

# Failures with no usable HTTP reply (refused, reset, dropped, timed out, a malformed reply,
# a proxy that failed): worth another attempt, as the openai client's APIConnectionError was.
_NO_RESPONSE = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


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
    throttled: int = 0  # 429 replies (each one also counted in retries or failed)

    @property
    def calls(self) -> int:
        """Logical calls, whether the cache or the endpoint answered them: the same count on a
        rerun from the cache, whatever the endpoint's handling of n."""
        return self.answered + self.cache_hits

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        # field names, not asdict(): asdict deep-copies, and this runs once per request
        for name in _USAGE_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def minus(self, other: Usage) -> Usage:
        return Usage(**{name: getattr(self, name) - getattr(other, name) for name in _USAGE_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calls": self.calls, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


_USAGE_FIELDS = tuple(item.name for item in fields(Usage))


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


@dataclass(frozen=True)
class Reply:
    """What one answered attempt brought back, wherever it was made, and how long the
    endpoint took to answer it as seen where it was made (None: measure it here)."""

    texts: list[str]
    input_tokens: int
    output_tokens: int
    latency: float | None = None


class AttemptFailed(Exception):
    """A failed attempt, wherever it was made: the HTTP status (0: no response, e.g. a lost
    connection or a timeout), the Retry-After it carried, the endpoint's words. Plain data,
    so that a Ray actor can send it back to the driver, whose retry rules read it."""

    def __init__(self, status: int, retry_after: float | None = None, detail: str = "") -> None:
        super().__init__(f"HTTP {status}" if status else detail or "no response")
        self.status_code = status
        self.retry_after_s = retry_after
        self.detail = detail


class Endpoint:
    """One OpenAI-compatible endpoint over aiohttp: ``POST /chat/completions`` and
    ``GET /models``, with the bearer key, and every failure as an ``AttemptFailed`` (HTTP
    status, Retry-After, the endpoint's message).

    Why not the ``openai`` client, which the served model (mlflow_project/prompt_model.py)
    uses: importing it took 1.1 s here against aiohttp's 0.3 s (benchmarks/http_client.py),
    most of it the type models of its whole API, and that was half of the time before a
    run's first request. Per request the two cost the same CPU (1.15 ms against 0.9-1.15 ms
    for its raw ``post`` over aiohttp, 3.2-3.6 ms for ``chat.completions.create`` over
    HTTPX); the chat protocol this loop needs is one JSON POST. The retry rules, limits and
    accounting are this module's either way (the openai client's own retries were off)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key or 'not-needed'}", "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No TLS context for a plain-HTTP endpoint (a local vLLM, Ollama, llama.cpp): loading
            # the certificate bundle costs 40-100 ms before the first request. The bound on
            # connections is the run's limiter, not the connector's.
            tls: ssl.SSLContext | bool = False if self.base_url.startswith("http://") else _tls_context()
            connector = aiohttp.TCPConnector(limit=0, ssl=tls)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, trust_env=True)
        return self._session

    async def post_chat(self, arguments: dict[str, Any]) -> Reply:
        """One chat completion: the reply's texts and token counts, or AttemptFailed."""
        data = await self._call("POST", "/chat/completions", arguments)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            raise UserError(
                f"the endpoint {self.base_url} did not answer like an OpenAI-compatible API: "
                "point --base-url at the API root (usually ending in /v1)"
            )
        texts = [
            str(((choice or {}).get("message") or {}).get("content") or "") for choice in choices if isinstance(choice, dict)
        ]
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Reply(texts, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))

    async def models(self) -> list[str]:
        """The model ids the endpoint lists (AttemptFailed for an error status)."""
        data = await self._call("GET", "/models", None)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ValueError("no model list")
        return [str(item.get("id")) for item in items if isinstance(item, dict) and item.get("id")]

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            async with self._open().request(
                method, self.base_url + path, headers=self.headers,
                data=None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8"),
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise AttemptFailed(response.status, _retry_after_header(response.headers), _body_message(raw))
        except aiohttp.ClientConnectorCertificateError as error:  # not transient: no retry
            reason = getattr(error, "certificate_error", None) or error
            raise UserError(
                f"the TLS connection to {self.base_url} failed ({' '.join(str(reason).split())[:200]}): if the server's "
                "certificate is signed by your own CA, set SSL_CERT_FILE to that CA's certificate"
            ) from None
        except _NO_RESPONSE as error:
            if isinstance(error, asyncio.TimeoutError):
                detail = f"no reply within {self.timeout.total:g} s (--timeout)"
            else:
                detail = f"no usable reply ({type(error).__name__})"
            raise AttemptFailed(0, None, detail) from None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _count(value: Any) -> int:
    """A token count as the endpoint reported it (0 when it did not, or not as a number)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _tls_context() -> ssl.SSLContext:
    """The certificate authorities to trust: SSL_CERT_FILE / SSL_CERT_DIR when set (a
    company CA, a self-signed server), else Mozilla's bundle (certifi), as the openai client
    does; the system's bundle may be missing."""
    import os

    return _trusting(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.lru_cache(maxsize=None)
def _trusting(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """One context per bundle and process: loading one takes 40-100 ms, and the endpoint
    check's (made while the data loads) then serves the run's first request."""
    if cafile is None and capath is None:
        import certifi

        cafile = certifi.where()
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"cannot load the CA certificates SSL_CERT_FILE/SSL_CERT_DIR name ({error}): fix or unset them") from None


def _body_message(raw: bytes) -> str:
    """The endpoint's own words in an error reply (OpenAI's ``{"error": {"message": …}}``)."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    text = " ".join(str(message or "").split())[:200]
    return f": {text}" if text else ""


def _status(error: BaseException) -> int | None:
    """The HTTP status of a failed attempt (0: no response), None for other errors."""
    if isinstance(error, AttemptFailed):
        return error.status_code
    return None


def retryable(error: BaseException) -> bool:
    """429, 5xx, 408/409/425, timeouts and lost connections are worth another attempt."""
    status = _status(error)
    return status is not None and (status in (0, 408, 409, 425, 429) or status >= 500)


class RateBudget:
    """Requests and tokens per minute, the limits API providers publish, as two token buckets
    that refill continuously. A bucket holds one second of its limit, so a run never bursts
    far above the provider's per-minute rate; a request larger than a bucket waits for a full
    one and then takes it below zero."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.buckets = [[limit / 60.0, limit / 60.0, limit / 60.0] for limit in (rpm, tpm) if limit]  # rate, size, level
        self.kinds = [kind for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit]
        self._time = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        for bucket in self.buckets:
            rate, size, level = bucket
            bucket[2] = min(size, level + rate * (now - self._time))
        self._time = now

    def delay(self, tokens: int) -> float:
        """Seconds until a request of ``tokens`` may start (0: now). A request larger than a
        bucket waits for a full bucket, then takes it below zero."""
        self._refill()
        wait = 0.0
        for (rate, size, level), need in zip(self.buckets, self._needs(tokens)):
            wait = max(wait, (min(need, size) - level) / rate)
        return max(wait, 0.0)

    def take(self, tokens: int) -> None:
        self._refill()
        for bucket, need in zip(self.buckets, self._needs(tokens)):
            bucket[2] -= need

    def _needs(self, tokens: int) -> list[float]:
        return [1.0 if kind == "requests" else float(tokens) for kind in self.kinds]


@dataclass
class Adaptive:
    """Additive increase, multiplicative decrease of the bound on requests in flight.

    The bound grows by one per round trip's worth of replies while it is what holds the
    requests back and replies come as fast as before. A 429 means the endpoint's limit is
    below the requests in flight then: the bound drops to ``DECREASE`` of those (once per
    burst: 429s of requests sent before the last decrease do not count again), and that count is remembered as a
    ceiling, below which the bound grows back at the normal pace and near which it probes
    ``PROBE_SLOWER`` times slower, so that a steady limit costs few 429s. Scoring replies
    that take more than ``LATENCY_FACTOR`` times the fastest ones seen (the endpoint queues
    them) shrink the bound to ``LATENCY_DECREASE`` of itself. ``Retry-After`` is waited out
    by the limiter."""

    limit: float = 16.0
    minimum: float = 1.0
    maximum: float = 256.0
    DECREASE = 0.75
    LATENCY_DECREASE = 0.9
    LATENCY_FACTOR = 2.0
    PROBE_SLOWER = 8.0
    baseline: float | None = None  # the fastest recent scoring reply, seconds
    smoothed: float | None = None  # moving average of scoring replies, seconds
    ceiling: float | None = None  # requests in flight when the last 429 came
    last_decrease: float = 0.0

    def round_trip(self) -> float:
        return self.smoothed or 0.5

    def on_success(self, latency: float, priority: int, limited: bool) -> None:
        if priority == SCORING:
            # the baseline drifts up slowly, so that an endpoint that got slower for good is
            # not read as queueing forever
            self.baseline = latency if self.baseline is None else min(latency, self.baseline * 1.01)
            self.smoothed = latency if self.smoothed is None else 0.9 * self.smoothed + 0.1 * latency
            now = time.monotonic()
            if self.smoothed > self.LATENCY_FACTOR * self.baseline and now - self.last_decrease > self.round_trip():
                self._decrease(self.limit * self.LATENCY_DECREASE, now)
                return
        if limited:
            near = self.ceiling is not None and self.limit + 1 >= self.ceiling
            self.limit = min(self.maximum, self.limit + 1.0 / (self.limit * (self.PROBE_SLOWER if near else 1.0)))
            if self.ceiling is not None and self.limit > self.ceiling:
                self.ceiling = None  # the endpoint takes more now

    def on_throttled(self, in_flight: int, sent: float) -> None:
        """A 429 for a request sent at ``sent`` (time.monotonic()); one sent before the last
        decrease belongs to the burst that caused it."""
        if sent > self.last_decrease:
            self.ceiling = float(max(in_flight, 1))
            self._decrease(min(self.limit, self.ceiling) * self.DECREASE, time.monotonic())

    def _decrease(self, limit: float, now: float) -> None:
        self.limit = max(self.minimum, limit)
        self.last_decrease = now


class PriorityLimiter:
    """A semaphore whose waiters are served by priority, then in arrival order.

    One instance bounds every request in flight in the run; meta-prompts (priority 0)
    overtake queued scoring requests (priority 1), so the chain of meta-prompts that the
    run must wait for is never stuck behind a round of scoring. With ``adaptive`` the bound
    follows the endpoint (``Adaptive``); with a ``RateBudget`` a request also waits for its
    share of the requests and tokens per minute; a ``Retry-After`` holds every new request.
    """

    def __init__(self, capacity: int, *, adaptive: Adaptive | None = None, rate: RateBudget | None = None) -> None:
        self.adaptive = adaptive
        self.rate = rate
        self._capacity = capacity
        self.in_flight = 0
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._hold_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.peak = 0  # most requests in flight since the last window()
        self._busy_area = 0.0  # requests in flight × seconds, since the last window()
        self._window_start = self._changed = time.monotonic()

    @property
    def capacity(self) -> int:
        return int(self.adaptive.limit) if self.adaptive else self._capacity

    async def acquire(self, priority: int = META, tokens: int = 0) -> None:
        if not self._waiters and self._may_start(tokens):
            self._start(tokens)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), tokens, future))
        self._wake()  # with nothing in flight, only a timer may start it (a hold, a rate budget)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()
            raise

    def release(self, latency: float | None = None, priority: int = SCORING) -> None:
        """A request is over; ``latency`` (seconds, a success) feeds the adaptive bound."""
        if self.adaptive is not None and latency is not None:
            self.adaptive.on_success(latency, priority, limited=bool(self._waiters) or self.in_flight >= self.capacity)
        self._account()
        self.in_flight -= 1
        self._wake()

    def throttle(self, retry_after: float | None, sent: float) -> None:
        """The endpoint answered 429 to a request sent at ``sent`` (time.monotonic()), with
        ``Retry-After`` seconds when it said."""
        if self.adaptive is not None:
            self.adaptive.on_throttled(self.in_flight, sent)
        if retry_after:
            self._hold_until = max(self._hold_until, time.monotonic() + retry_after)

    def window(self) -> dict[str, float]:
        """The bound now, the peak and the time-averaged requests in flight since the last call."""
        self._account()
        now = time.monotonic()
        mean = self._busy_area / (now - self._window_start) if now > self._window_start else float(self.in_flight)
        stats = {"limit": float(self.capacity), "peak": float(self.peak), "mean": mean}
        self.peak, self._busy_area, self._window_start = self.in_flight, 0.0, now
        return stats

    def _account(self) -> None:
        now = time.monotonic()
        self._busy_area += self.in_flight * (now - self._changed)
        self._changed = now

    def _delay(self, tokens: int) -> float:
        wait = self._hold_until - time.monotonic()
        if self.rate is not None:
            wait = max(wait, self.rate.delay(tokens))
        return wait

    def _may_start(self, tokens: int) -> bool:
        return self.in_flight < self.capacity and self._delay(tokens) <= 0

    def _start(self, tokens: int) -> None:
        self._account()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.rate is not None:
            self.rate.take(tokens)

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.capacity:
            _, _, tokens, future = self._waiters[0]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            wait = self._delay(tokens)
            if wait > 0:
                if self._timer is None:
                    def fire() -> None:
                        self._timer = None
                        self._wake()

                    self._timer = asyncio.get_running_loop().call_later(wait, fire)
                return
            heapq.heappop(self._waiters)
            self._start(tokens)
            future.set_result(None)


def request_tokens(messages: Messages, max_tokens: int) -> int:
    """What a request counts against a tokens-per-minute limit, as providers estimate it
    before answering: about 4 characters a token of input, plus the output it may write."""
    return sum(len(str(message.get("content") or "")) for message in messages) // 4 + max_tokens


def retry_after(error: BaseException | None) -> float | None:
    """The seconds a failed attempt's ``Retry-After`` (or ``retry-after-ms``) asked for, if any."""
    if isinstance(error, AttemptFailed):
        return error.retry_after_s
    return None


def _retry_after_header(headers: Any) -> float | None:
    """The seconds a reply's ``Retry-After`` (or ``retry-after-ms``) header asks for, if any."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(max(float(value) * scale, 0.0), 300.0)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value) if name == "retry-after" else None
            except (TypeError, ValueError):  # neither seconds nor an HTTP date: not a usable wait
                parsed = None
            if parsed is not None:
                return min(max(parsed.timestamp() - time.time(), 0.0), 300.0)
    return None


def retry_delay(error: Exception, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): Retry-After if the endpoint gave one."""
    asked = retry_after(error)
    if asked is not None:
        return asked
    exponential = min(cap, base * (2**attempt))
    return exponential * (0.5 + rng.random() / 2)


def _status_error(status: int, detail: str, base_url: str, model: str) -> UserError:
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
        self.endpoint = Endpoint(self.base_url, api_key, timeout)

    async def aclose(self) -> None:
        await self.endpoint.close()

    async def post(self, arguments: dict[str, Any]) -> Reply:
        """One attempt at a chat completion from this process (no cache, limiter or retry)."""
        return await self.endpoint.post_chat(arguments)

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
        send: Send | None = None,
    ) -> list[str]:
        """The cached reply, else the endpoint's (``send``: each attempt made elsewhere, see
        ``fetch_and_store``)."""
        key = self.cache_key(messages, temperature=temperature, max_tokens=max_tokens, n=n, sample=sample, stop=stop)
        cached = self.lookup(key, stage)
        if cached is not None:
            return cached
        return await self.fetch_and_store(
            key, messages, temperature=temperature, n=n, max_tokens=max_tokens, stage=stage, sample=sample,
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
    ) -> list[str]:
        """One reply each (n=1, sample 0) to a stage's worth of requests: the cache is asked
        once for all of them, and only the misses go to the endpoint, at once under the
        limiter. ``on_done`` hears of every request answered (cached ones in one call)."""
        if self.cache is None:  # no keys to compute
            keys = [str(i) for i in range(len(requests))]
            found: dict[str, CachedReply] = {}
        else:
            keys = [self.cache_key(messages, temperature=temperature, max_tokens=max_tokens, n=1, sample=0, stop=stop)
                    for messages in requests]
            found = self.cache.get_many(keys)
        if found:
            hits = sum(key in found for key in keys)
            tokens = sum(found[key].input_tokens + found[key].output_tokens for key in keys if key in found)
            self.meter.record(stage, Usage(cache_hits=hits, cached_tokens=tokens))
            if on_done:
                on_done(hits)

        async def miss(key: str, messages: Messages) -> str:
            texts = await self.fetch_and_store(
                key, messages, temperature=temperature, n=1, max_tokens=max_tokens, stage=stage, sample=0,
                priority=priority, stop=stop, send=send,
            )
            if on_done:
                on_done(1)
            return texts[0] if texts else ""

        misses = [(i, key, messages) for i, (key, messages) in enumerate(zip(keys, requests)) if key not in found]
        replies = [(found[key].texts or [""])[0] if key in found else "" for key in keys]
        answered = await asyncio.gather(*(miss(key, messages) for _, key, messages in misses))
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
        sample: int | str,
        priority: int,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
    ) -> list[str]:
        """A cache miss: asks the endpoint, counts what it cost (failures too) and caches it.
        ``send`` makes each attempt elsewhere (a Ray actor) under this client's limiter,
        retry rules and accounting."""
        spent = Usage()
        started = time.time()
        try:
            texts = await self.fetch(
                messages, temperature=temperature, n=n, max_tokens=max_tokens, sample=sample, priority=priority,
                spent=spent, stop=stop, send=send,
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
        send: Send | None = None,
    ) -> list[str]:
        """Asks the endpoint (no cache): n samples, retried as the rules say; adds what it
        cost, retries and failures included, to ``spent``."""
        seed = self._request_seed(sample) if temperature > 0 else None
        if n == 1:  # no task of its own for the common case
            return (await self._request(messages, temperature, 1, max_tokens, priority, _offset(seed, 0), spent, stop, send))[:1]
        if self.native_n is False:
            replies = await asyncio.gather(
                *(self._request(messages, temperature, 1, max_tokens, priority, _offset(seed, i), spent, stop, send) for i in range(n))
            )
        else:
            first = await self._request(messages, temperature, n, max_tokens, priority, seed, spent, stop, send)
            replies = [first]
            if len(first) < n:
                if self.native_n is True:
                    raise UserError(
                        f"the endpoint {self.base_url} returned {len(first)} of {n} samples: use --n-mode separate or auto"
                    )
                self.native_n = False
                replies += await asyncio.gather(
                    *(
                        self._request(messages, temperature, 1, max_tokens, priority, _offset(seed, i), spent, stop, send)
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
        send: Send | None = None,
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
        def wait(state: RetryCallState) -> float:
            # attempt k of this loop is the run's attempt k + 1: its failure is retry k (0-based)
            error = state.outcome.exception() if state.outcome else None
            return retry_delay(error, state.attempt_number, self.backoff_base, self.backoff_max, self._jitter)

        def count_retry(state: RetryCallState) -> None:
            spent.retries += 1

        tokens = request_tokens(messages, max_tokens * n) if self.limiter.rate is not None else 0

        async def attempt() -> Any:
            await self.limiter.acquire(priority, tokens)
            started = time.monotonic()
            latency = None
            try:
                if send is not None:
                    response = await send(arguments)
                else:
                    response = await self.post(arguments)
                # The endpoint's time as the process that sent it saw it: for a Ray actor's
                # attempt, the wait for its batch and the trip back are not the endpoint queueing.
                latency = response.latency if response.latency is not None else time.monotonic() - started
                return response
            except Exception as error:
                if _status(error) == 429:
                    spent.throttled += 1
                    self.limiter.throttle(retry_after(error), started)
                raise
            finally:
                self.limiter.release(latency, priority)  # the slot is free while the retry waits

        try:
            try:
                response = await attempt()  # most requests succeed at once: no retry loop for them
            except Exception as error:
                if not retryable(error) or self.max_retries < 1:
                    raise
                # tenacity runs the retry loop; the rules are ours: which errors, how long to wait
                # (Retry-After first, else exponential backoff with jitter), how many times.
                spent.retries += 1
                await asyncio.sleep(retry_delay(error, 0, self.backoff_base, self.backoff_max, self._jitter))
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(self.max_retries),
                    wait=wait,
                    retry=retry_if_exception(retryable),
                    before_sleep=count_retry,
                    reraise=True,
                )
                response = await retrying(attempt)
        except AttemptFailed as error:
            spent.failed += 1
            if not retryable(error):
                raise _status_error(error.status_code, error.detail, self.base_url, self.model) from None
            raise EndpointUnavailable(
                f"{self.base_url} kept failing after {self.max_retries} retries ({_describe_error(error)})"
            ) from None
        return self._read(response, spent)

    def _read(self, reply: Reply, spent: Usage) -> list[str]:
        spent.requests += 1
        spent.input_tokens += reply.input_tokens
        spent.output_tokens += reply.output_tokens
        spent.cost += self.cost(reply.input_tokens, reply.output_tokens)
        return reply.texts


def _offset(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % (2**31)


def _describe_error(error: Exception | None) -> str:
    if isinstance(error, AttemptFailed) and error.status_code:
        return f"last error: HTTP {error.status_code}"
    if isinstance(error, AttemptFailed):
        return f"last error: {error.detail or 'no response'}"
    if error is None:
        return "no attempt made"
    return f"last error: {type(error).__name__}"


async def check_endpoint(base_url: str, api_key: str | None, model: str, timeout: float = 10.0) -> None:
    """Fails fast, with the fix in one line, when the endpoint is unreachable, rejects the key
    or does not serve the model. Endpoints without a model list are let through."""
    endpoint = Endpoint(base_url, api_key, timeout)
    try:
        served = await endpoint.models()
    except AttemptFailed as error:
        if error.status_code == 0:
            raise UserError(
                f"cannot reach the endpoint {base_url}: start the server or fix --base-url (or OPENAI_BASE_URL)"
            ) from None
        if error.status_code in (401, 403):
            raise _status_error(error.status_code, error.detail, base_url, model) from None
        return  # no /models route: the first real request will tell
    except UserError:
        raise
    except Exception:
        raise UserError(
            f"the endpoint {base_url} did not answer like an OpenAI-compatible API: point --base-url at the API root "
            "(usually ending in /v1)"
        ) from None
    finally:
        await endpoint.close()
    if served and not any(name == model or name.split(":")[0] == model for name in served):
        shown = ", ".join(served[:10]) + (" …" if len(served) > 10 else "")
        raise UserError(f"the endpoint {base_url} does not serve model {model!r}: pass --model with one of {shown}")
