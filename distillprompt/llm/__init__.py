"""The optimizer's only code that talks to an OpenAI-compatible endpoint: usage (what calls
cost), transport (``Endpoint``), limits (the bound on requests in flight, AIMD, rates per
minute), retry (which failures are worth another attempt), refusals (what the endpoint does
not take, and requests it refuses for what they hold) and the client (``ChatClient``, the
``LLM`` protocol)."""

from .client import LLM, ChatClient, ReplyRecorder, Send, SpendingCheck, Transport
from .refusals import CONTENT_FILTER, CONTEXT_LENGTH, REASONS, Accepts, RequestRefused
from .limits import META, SCORING, Adaptive, PriorityLimiter, RateBudget, request_tokens, text_tokens
from .retry import Retries, retry_after, retry_delay, retryable
from .transport import AttemptFailed, Endpoint, Failure, Reply, check_endpoint
from .usage import LLMCall, Messages, Prices, Usage, UsageMeter

__all__ = [
    "LLM", "ChatClient", "ReplyRecorder", "Send", "SpendingCheck", "Transport", "Prices", "META", "SCORING", "Adaptive", "PriorityLimiter", "RateBudget", "text_tokens",
    "request_tokens", "Retries", "retry_after", "retry_delay", "retryable", "AttemptFailed", "Endpoint", "Failure", "Reply",
    "check_endpoint", "LLMCall", "Messages", "Usage", "UsageMeter", "Accepts", "RequestRefused", "CONTEXT_LENGTH",
    "CONTENT_FILTER", "REASONS",
]
