"""The endpoint's side of a call (no cache): n samples, asked in one request or one by one as
the endpoint takes them, each request under the run's limiter, retried as the rules say
(``retry.py``), sent again without a parameter the model does not take, refused for what it
holds (``refusals.py``), and what it cost added up."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Protocol

from ..cache import request_key
from ..errors import EndpointUnavailable, UserError
from .limits import PriorityLimiter, request_tokens
from .refusals import Accepts
from .retry import Retries, describe_error, retry_after, retryable, status_of
from .transport import AttemptFailed, Reply, status_error
from .usage import Messages, Prices, Usage

# one attempt made elsewhere: the request's arguments in, a Reply out (or AttemptFailed)
Send = Callable[[dict[str, Any]], Awaitable[Reply]]


class Transport(Protocol):
    """One attempt at a chat completion (``transport.Endpoint``; the estimate's dry-run
    endpoint answers without a model)."""

    async def post_chat(self, arguments: dict[str, Any]) -> Reply: ...

    async def close(self) -> None: ...


class SpendingCheck(Protocol):
    """What the client asks before every call, a call the cache answers too (``--max-cost``:
    ``cost.CostCap``)."""

    def check(self, stage: str) -> None:
        """Raises ``CostLimitReached`` when no new call for ``stage`` may go out."""


class Requester:
    """Asks one endpoint and model for replies, request by request."""

    def __init__(
        self, base_url: str, model: str, transport: Transport, limiter: PriorityLimiter, retries: Retries,
        accepts: Accepts, n_mode: str = "auto", prices: Prices = Prices(), seed: int | None = None,
        cost_cap: SpendingCheck | None = None,
    ) -> None:
        self.base_url = base_url  # masked: shown in errors
        self.model = model
        self.transport = transport
        self.limiter = limiter
        self.retries = retries
        self.accepts = accepts
        self.native_n: bool | None = {"native": True, "separate": False}.get(n_mode)
        self.prices = prices
        self.seed = seed
        self.cost_cap = cost_cap

    async def fetch(
        self,
        messages: Messages,
        *,
        temperature: float,
        n: int,
        max_tokens: int,
        salt: int | str,
        priority: int,
        spent: Usage,
        stop: tuple[str, ...] = (),
        send: Send | None = None,
        stage: str = "",
    ) -> list[str]:
        """Asks the endpoint (no cache): n samples, retried as the rules say; adds what it
        cost, retries and failures included, to ``spent``."""
        seed = sampling_seed(self.seed, temperature, salt)

        def ask(count: int, seed: int | None) -> Awaitable[list[str]]:
            return self._request(messages, temperature, count, max_tokens, priority, seed, spent, stop, send, stage)

        if n == 1:  # no task of its own for the common case
            return (await ask(1, _offset(seed, 0)))[:1]
        if self.native_n is True and not self.accepts.takes("n"):
            raise UserError(
                f"the endpoint {self.base_url} does not take n for model {self.model!r}: use --n-mode separate or auto"
            )
        if self.native_n is False or not self.accepts.takes("n"):
            replies = await asyncio.gather(*(ask(1, _offset(seed, i)) for i in range(n)))
        else:
            first = await ask(n, seed)
            replies = [first]
            if len(first) < n:
                if self.native_n is True:
                    raise UserError(
                        f"the endpoint {self.base_url} returned {len(first)} of {n} samples: use --n-mode separate or auto"
                    )
                self.native_n = False
                replies += await asyncio.gather(*(ask(1, _offset(seed, i)) for i in range(len(first), n)))
            elif self.native_n is None:
                self.native_n = True
        return [text for reply in replies for text in reply][:n]

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
        stage: str = "",
    ) -> list[str]:
        accepts = self.accepts
        sent: dict[str, Any] = {}
        tokens = request_tokens(messages, accepts.budget(max_tokens) * n) if self.limiter.rate is not None else 0

        async def attempt() -> Reply:
            nonlocal sent
            await self.limiter.acquire(priority, tokens)
            started = time.monotonic()
            latency = None
            try:
                if self.cost_cap is not None:
                    self.cost_cap.check(stage)  # a request that waited for its slot while the budget ran out
                # built once it has its slot: what the endpoint takes may have been learned meanwhile
                sent = accepts.arguments(
                    messages, temperature=temperature, n=n, max_tokens=max_tokens, seed=seed, stop=stop
                )
                response = await (send(sent) if send is not None else self.transport.post_chat(sent))
                # The endpoint's time as the process that sent it saw it: for a Ray actor's
                # attempt, the wait for its batch and the trip back are not the endpoint queueing.
                latency = response.latency if response.latency is not None else time.monotonic() - started
                return response
            except Exception as error:
                if status_of(error) == 429:
                    spent.throttled += 1
                    self.limiter.throttle(retry_after(error), started)
                raise
            finally:
                self.limiter.release(latency, priority)  # the slot is free while the retry waits

        while True:
            try:
                response = await self.retries.run(attempt, spent)
                break
            except AttemptFailed as error:
                if accepts.learn(error, sent):  # a parameter the model does not take: sent again without it
                    spent.parameter_refusals += 1
                    continue
                refusal = accepts.refused(error)
                if refusal is not None:  # too long, or a content filter: this request's loss, not the run's
                    spent.refusals += 1
                    raise refusal from None
                spent.failed += 1
                if not retryable(error):
                    raise status_error(error.status_code, error.detail, self.base_url, self.model) from None
                raise EndpointUnavailable(
                    f"{self.base_url} kept failing after {self.retries.most} retries ({describe_error(error)})"
                ) from None
        accepts.ran_out(response.ran_out)
        spent.requests += 1
        spent.input_tokens += response.input_tokens
        spent.output_tokens += response.output_tokens
        spent.reasoning_tokens += response.reasoning_tokens
        spent.cost += self.prices.cost(response.input_tokens, response.output_tokens)
        return response.texts


def sampling_seed(run_seed: int | None, temperature: float, salt: int | str) -> int | None:
    """The seed sent with a sampled request (none at temperature 0), from the run's seed and the salt."""
    if run_seed is None or temperature <= 0:
        return None
    digest = request_key(endpoint="", model="", messages=[], temperature=0, max_tokens=0, n=0, salt=f"{run_seed}:{salt}")
    return int(digest[:8], 16)


def _offset(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % (2**31)
