"""What LLM calls cost: usage per call and per stage, and the record of one answered call."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prices:
    """What a request costs: its input and output tokens at USD per 1M tokens (``--price-input``,
    ``--price-output``). The one price model of a run: paid requests, the replies the cache
    serves, the estimate and ``--max-cost`` all count with it."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000

    def __bool__(self) -> bool:
        """Whether the run is priced at all."""
        return bool(self.input or self.output)


@dataclass
class Usage:
    """What a set of LLM calls cost. Three counts: ``requests``, the HTTP requests the
    endpoint received; ``answered``, the calls it answered (a call for n samples of an
    endpoint that does not take n is n requests); ``calls``, those and the calls the response
    cache answered (``cache_hits``)."""

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
    cached_cost: float = 0.0  # what the replies the cache served cost at today's prices (not paid again)
    cached_output_tokens: int = 0  # of cached_tokens, the replies' own (the rest: their requests')
    reasoning_tokens: int = 0  # of output_tokens, a reasoning model's hidden reasoning (paid as output)
    refusals: int = 0  # requests the endpoint refused for what they hold (too long, a content filter): not sent again
    parameter_refusals: int = 0  # requests refused for a parameter the model does not take, sent again without it

    @property
    def all_cost(self) -> float:
        """What every call cost, the cache's included: what ``--max-cost`` counts, so that a
        rerun from the cache stops where the first run stopped."""
        return self.cost + self.cached_cost

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
