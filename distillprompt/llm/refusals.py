"""What an endpoint refuses, and what follows from it.

Two kinds of 400 are not a wrong setting:

* a parameter the model does not take. OpenAI's reasoning models (the o-series and the gpt-5
  family) refuse ``max_tokens`` ("Use 'max_completion_tokens' instead") and any temperature
  but the default; some endpoints refuse ``n``, ``stop`` or ``seed``. ``Accepts`` learns from
  the refusal what the endpoint takes, says so once, and every later request of the run is
  built that way; the refused request is sent again as the endpoint takes it.
* a request refused for what it holds: longer than the model's context, or stopped by a
  content filter. ``refusal_reason`` names it; the client raises ``RequestRefused``, and the
  request's example scores as wrong (a meta-prompt is shortened or dropped) instead of the
  run ending.

Anything else (a bad model name, a rejected key) stays the one-line ``UserError`` it was.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .transport import AttemptFailed

log = logging.getLogger(__name__)

TOKEN_LIMIT = "max_tokens"
COMPLETION_LIMIT = "max_completion_tokens"  # what OpenAI's reasoning models take instead
# parameters a request can go without: the endpoint's default temperature, one sample a
# request (n), no stop sequence (the answer parser reads past it), no sampling seed
OPTIONAL = ("temperature", "n", "stop", "seed")
WITHOUT = {
    "temperature": "no temperature (the model's default)",
    "n": "one sample a request (n left out)",
    "stop": "no stop sequences",
    "seed": "no sampling seed",
}
UNSUPPORTED_CODES = {"unsupported_parameter", "unsupported_value"}
UNSUPPORTED_WORDS = re.compile(
    r"unsupported (?:parameter|value):? '?([\w.]+)'?|unrecognized request arguments? supplied:? '?([\w.]+)'?",
    re.IGNORECASE,
)

# reasons a request is refused for what it holds (scoring: the example scores as wrong)
CONTEXT_LENGTH = "context_length"
CONTENT_FILTER = "content_filter"
REASONS = {CONTEXT_LENGTH: "longer than the model's context", CONTENT_FILTER: "stopped by a content filter"}
CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"}
CONTEXT_WORDS = re.compile(
    r"maximum context length|context (?:length|window|size)|too many tokens|prompt is too long"
    r"|exceeds? the (?:available )?context",
    re.IGNORECASE,
)
CONTENT_CODES = {"content_filter", "content_policy_violation", "invalid_prompt", "responsibleaipolicyviolation"}
CONTENT_WORDS = re.compile(
    r"content (?:management )?(?:policy|filter)|flagged as potentially violating|usage polic(?:y|ies)", re.IGNORECASE
)
CONTEXT_SIZE = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)


class RequestRefused(Exception):
    """The endpoint refused one request for what it holds (``reason``: ``context_length`` or
    ``content_filter``), in its own words (``detail``). Not the run's fault and not worth
    another attempt: a scoring request scores as an unparsed answer, a meta-prompt is asked
    again with fewer examples or dropped, each counted."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{REASONS.get(reason, reason)}: {detail}")
        self.reason = reason
        self.detail = detail


def refused_parameter(error: AttemptFailed) -> str | None:
    """The parameter a 400 says the model does not take, if it says so."""
    if error.status_code != 400:
        return None
    named = UNSUPPORTED_WORDS.search(error.message)
    if error.param and (error.code in UNSUPPORTED_CODES or named):
        return error.param
    if named:
        return named.group(1) or named.group(2)
    return None


def refusal_reason(error: AttemptFailed) -> str | None:
    """``context_length`` or ``content_filter`` when the endpoint refused the request for what
    it holds, else None (a fault of the settings or the endpoint)."""
    if error.status_code not in (400, 413, 422):
        return None
    code = error.code.lower()
    if code in CONTEXT_CODES or CONTEXT_WORDS.search(error.message):
        return CONTEXT_LENGTH
    if code in CONTENT_CODES or CONTENT_WORDS.search(error.message):
        return CONTENT_FILTER
    return None


@dataclass
class Accepts:
    """What one endpoint and model take of a chat request, learned during the run and shared
    by every client of it (the runner hands one to each client of the same endpoint and
    model; Ray actors send what the driver builds).

    Budgets: once the endpoint takes ``max_completion_tokens`` (a reasoning model, whose
    hidden reasoning counts against that limit), every request's budget is its answer budget
    plus ``reasoning_room`` tokens (``--reasoning-tokens``): a ceiling, of which only what the
    model uses is paid."""

    base_url: str
    model: str
    reasoning_room: int = 0
    limit_name: str = TOKEN_LIMIT
    left_out: set[str] = field(default_factory=set)  # optional parameters the endpoint refused
    context_tokens: int | None = None  # the model's context, when a refusal said it
    _said: set[str] = field(default_factory=set)

    @property
    def reasoning(self) -> bool:
        """Whether the endpoint took ``max_completion_tokens``: its budgets make room to think."""
        return self.limit_name == COMPLETION_LIMIT

    def budget(self, max_tokens: int) -> int:
        """The token limit sent for an answer budget of ``max_tokens``."""
        return max_tokens + (self.reasoning_room if self.reasoning else 0)

    def takes(self, name: str) -> bool:
        return name not in self.left_out

    def arguments(
        self, messages: Any, *, temperature: float, n: int, max_tokens: int, seed: int | None, stop: tuple[str, ...]
    ) -> dict[str, Any]:
        """A chat request's body as the endpoint takes it, as far as the run knows."""
        arguments: dict[str, Any] = {"model": self.model, "messages": messages, self.limit_name: self.budget(max_tokens)}
        optional = {"temperature": temperature, "n": n if n > 1 else None, "seed": seed, "stop": list(stop) or None}
        for name, value in optional.items():
            if value is not None and self.takes(name):
                arguments[name] = value
        return arguments

    def learn(self, error: AttemptFailed, sent: dict[str, Any]) -> bool:
        """Whether the request refused with ``error`` (whose body was ``sent``) goes again as
        the endpoint takes it: the refusal names a parameter the request carried that the run
        now knows the endpoint does not take. Learned here, and said once; a refusal of a
        request sent before an earlier one taught the same is sent again silently."""
        name = refused_parameter(error)
        if name is None or name not in sent:
            return False
        if name == TOKEN_LIMIT:
            if not self.reasoning:
                self.limit_name = COMPLETION_LIMIT
                room = f", with {self.reasoning_room} tokens more room to reason" if self.reasoning_room else ""
                self._say(name, error, f"sending max_completion_tokens{room}")
            return True
        if name in OPTIONAL:
            if self.takes(name):
                self.left_out.add(name)
                self._say(name, error, f"sending {WITHOUT[name]}")
            return True
        return False

    def refused(self, error: AttemptFailed) -> RequestRefused | None:
        """The refusal of a request for what it holds, said once per reason; None for any other error."""
        reason = refusal_reason(error)
        if reason is None:
            return None
        size = CONTEXT_SIZE.search(error.message)
        if size:
            self.context_tokens = int(size.group(1))
        if reason not in self._said:
            self._said.add(reason)
            log.warning("the endpoint %s refused a request to model %r as %s (%s): such a request counts as a "
                        "wrong answer (a meta-prompt is shortened or dropped) and the run goes on; result.json lists "
                        "them (refused)", self.base_url, self.model, REASONS[reason], error.message)
        return RequestRefused(reason, error.message)

    def ran_out(self, cut: int) -> None:
        """Replies that came back empty because the token limit ran out first (a reasoning
        model that used it all to think): said once, with the setting that gives more room."""
        if cut and "ran_out" not in self._said:
            self._said.add("ran_out")
            log.warning("model %r used its whole token limit before answering (finish_reason length, no content): such "
                        "a reply counts as unparsed; raise --reasoning-tokens (or --answer-max-tokens and "
                        "--meta-max-tokens)", self.model)

    def _say(self, name: str, error: AttemptFailed, change: str) -> None:
        log.warning("the endpoint %s does not take %r for model %r (%s): %s for the rest of the run",
                    self.base_url, name, self.model, error.message or f"HTTP {error.status_code}", change)

    def record(self) -> dict[str, Any]:
        """What was learned, for ``result.json`` and the registered model's config."""
        return {
            "model": self.model,
            "token_limit": self.limit_name,
            "left_out": sorted(self.left_out),
            "reasoning_room": self.reasoning_room if self.reasoning else 0,
            "context_tokens": self.context_tokens,
        }
