"""Which failed attempts are worth another, and how long to wait before it."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from .transport import AttemptFailed
from .usage import Usage

T = TypeVar("T")


def status_of(error: BaseException) -> int | None:
    """The HTTP status of a failed attempt (0: no response), None for other errors."""
    if isinstance(error, AttemptFailed):
        return error.status_code
    return None


def retryable(error: BaseException) -> bool:
    """429, 5xx, 408/409/425, timeouts and lost connections are worth another attempt."""
    status = status_of(error)
    return status is not None and (status in (0, 408, 409, 425, 429) or status >= 500)


def retry_after(error: BaseException | None) -> float | None:
    """The seconds a failed attempt's ``Retry-After`` (or ``retry-after-ms``) asked for, if any."""
    if isinstance(error, AttemptFailed):
        return error.retry_after_s
    return None


def retry_delay(error: Exception, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): Retry-After if the endpoint gave one."""
    asked = retry_after(error)
    if asked is not None:
        return asked
    exponential = min(cap, base * (2**attempt))
    return exponential * (0.5 + rng.random() / 2)


def describe_error(error: Exception | None) -> str:
    if isinstance(error, AttemptFailed) and error.status_code:
        return f"last error: HTTP {error.status_code}"
    if isinstance(error, AttemptFailed):
        return f"last error: {error.detail or 'no response'}"
    if error is None:
        return "no attempt made"
    return f"last error: {type(error).__name__}"


@dataclass
class Retries:
    """The retry rules of one client: at most ``most`` retries of a retryable failure, each
    after the endpoint's Retry-After or else an exponential backoff with jitter."""

    most: int
    base: float
    cap: float
    jitter: random.Random

    async def run(self, attempt: Callable[[], Awaitable[T]], spent: Usage) -> T:
        """The first attempt's result, else a retry's; counts the retries in ``spent``; the
        last failure is raised as it came."""
        try:
            return await attempt()  # most requests succeed at once: no retry loop for them
        except Exception as error:
            if not retryable(error) or self.most < 1:
                raise
            spent.retries += 1
            await asyncio.sleep(retry_delay(error, 0, self.base, self.cap, self.jitter))

        def wait(state: RetryCallState) -> float:
            # attempt k of this loop is the request's attempt k + 1: its failure is retry k (0-based)
            error = state.outcome.exception() if state.outcome else None
            return retry_delay(error, state.attempt_number, self.base, self.cap, self.jitter)

        def count(state: RetryCallState) -> None:
            spent.retries += 1

        # tenacity runs the retry loop; the rules are ours: which errors, how long to wait, how many times
        retrying: Any = AsyncRetrying(
            stop=stop_after_attempt(self.most), wait=wait, retry=retry_if_exception(retryable), before_sleep=count,
            reraise=True,
        )
        return await retrying(attempt)
