"""How fast a run sends: one bound on the requests in flight (fixed or adaptive), served by
priority, and the requests and tokens per minute a provider allows."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Callable

from .usage import Messages

# Priorities of the request limiter: lower goes first.
META = 0
SCORING = 1


class RateBudget:
    """Requests and tokens per minute, the limits API providers publish, as two token buckets
    that refill continuously. A bucket holds one second of its limit, so a run never bursts
    far above the provider's per-minute rate; a request larger than a bucket waits for a full
    one and then takes it below zero."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = [[limit / 60.0, limit / 60.0, limit / 60.0] for limit in (rpm, tpm) if limit]  # rate, size, level
        self.kinds = [kind for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit]
        self.clock = clock  # seconds, monotonic
        self._time = clock()

    def _refill(self) -> None:
        now = self.clock()
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


CHARS_PER_TOKEN = 4  # what providers use to budget a request before a tokenizer has seen it


def text_tokens(text: str) -> int:
    """A text's tokens, estimated at 4 characters a token (at least 1): no tokenizer for an
    arbitrary endpoint's model is available offline."""
    return max(1, len(text) // CHARS_PER_TOKEN)


def request_tokens(messages: Messages, max_tokens: int) -> int:
    """What a request counts against a tokens-per-minute limit, as providers estimate it
    before answering: about 4 characters a token of input, plus the output it may write."""
    return sum(len(str(message.get("content") or "")) for message in messages) // 4 + max_tokens
