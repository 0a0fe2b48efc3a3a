"""One OpenAI-compatible endpoint over HTTP: the only code that opens a connection to it.

``Endpoint`` posts chat completions and lists models; every failure comes back as an
``AttemptFailed`` (the HTTP status, its Retry-After, the endpoint's words), plain data that
a Ray actor can send back to the driver, whose retry rules read it. ``check_endpoint`` fails
fast, before a run, when the endpoint is unreachable, rejects the key or lacks the model.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp

from ..errors import UserError
from ..urls import MASK, masked, request_parts

# Failures with no usable HTTP reply (refused, reset, dropped, timed out, a malformed reply,
# a proxy that failed): worth another attempt, as the openai client's APIConnectionError was.
_NO_RESPONSE = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class Reply:
    """What one answered attempt brought back, wherever it was made, and how long the
    endpoint took to answer it as seen where it was made (None: measure it here)."""

    texts: list[str]
    input_tokens: int
    output_tokens: int
    latency: float | None = None
    reasoning_tokens: int = 0  # of output_tokens, hidden reasoning (usage.completion_tokens_details)
    ran_out: int = 0  # choices with no content because the token limit ended them (finish_reason "length")


@dataclass(frozen=True)
class Failure:
    """A failed attempt as plain data, for a process that makes attempts for another (a Ray
    actor for the driver): ``raise_`` raises it again where the retry rules are."""

    kind: str  # "attempt" (an HTTP status or no response), "user_error" (not retried) or "unexpected"
    status: int = 0
    retry_after: float | None = None
    detail: str = ""
    code: str = ""
    param: str = ""

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        if isinstance(error, AttemptFailed):
            return cls("attempt", error.status_code, error.retry_after_s, error.detail, error.code, error.param)
        if isinstance(error, UserError):
            return cls("user_error", detail=str(error))
        return cls("unexpected", detail=f"{type(error).__name__}: {error}")

    def raise_(self) -> NoReturn:
        if self.kind == "attempt":
            raise AttemptFailed(self.status, self.retry_after, self.detail, self.code, self.param)
        if self.kind == "user_error":
            raise UserError(self.detail)
        raise RuntimeError(f"a scoring actor failed on a request: {self.detail}")


class AttemptFailed(Exception):
    """A failed attempt, wherever it was made: the HTTP status (0: no response, e.g. a lost
    connection or a timeout), the Retry-After it carried, the endpoint's words, and the
    ``code`` and ``param`` of an OpenAI-style error body (``unsupported_parameter`` and
    ``max_tokens``, ``context_length_exceeded`` …). Plain data, so that a Ray actor can send
    it back to the driver, whose retry rules and adaptation (``accepts.py``) read it."""

    def __init__(
        self, status: int, retry_after: float | None = None, detail: str = "", code: str = "", param: str = ""
    ) -> None:
        super().__init__(f"HTTP {status}" if status else detail or "no response")
        self.status_code = status
        self.retry_after_s = retry_after
        self.detail = detail
        self.code = code
        self.param = param

    @property
    def message(self) -> str:
        """The endpoint's own words, without the leading ": " of ``detail``."""
        return self.detail.removeprefix(": ")


class Endpoint:
    """One OpenAI-compatible endpoint over aiohttp: ``POST /chat/completions`` and
    ``GET /models``, with the bearer key, and every failure as an ``AttemptFailed`` (HTTP
    status, Retry-After, the endpoint's message).

    Not the ``openai`` client (which the served model uses): its import was half of the time
    before a run's first request, and the chat protocol this loop needs is one JSON POST
    (docs/decisions.md). Retries, limits and accounting are the client's (``client.py``)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.base_url = masked(base_url.rstrip("/"))  # what messages show
        # credentials in the URL (``user:password@``) go as HTTP basic auth, in the one
        # Authorization header, where the key's bearer token would go (as httpx and requests
        # do); a query (``?api-key=…``) goes with every request
        self._target = request_parts(base_url)
        authorization = self._target.authorization or f"Bearer {api_key or 'not-needed'}"
        self.headers = {"Authorization": authorization, "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No TLS context for a plain-HTTP endpoint (a local vLLM, Ollama, llama.cpp): loading
            # the certificate bundle delays the first request. The bound on connections is the
            # run's limiter, not the connector's.
            tls: ssl.SSLContext | bool = False if self._target.root.startswith("http://") else _tls_context()
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
        choices = [choice for choice in choices if isinstance(choice, dict)]
        texts = [str((choice.get("message") or {}).get("content") or "") for choice in choices]
        ran_out = sum(1 for choice, text in zip(choices, texts) if not text and choice.get("finish_reason") == "length")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        details = usage.get("completion_tokens_details")
        reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
        # OpenAI counts the reasoning in completion_tokens; an endpoint that reports it apart
        # (fewer completion than reasoning tokens) has it added, so that it is paid as output
        output = _count(usage.get("completion_tokens"))
        output = output if output >= reasoning else output + reasoning
        return Reply(texts, _count(usage.get("prompt_tokens")), output, reasoning_tokens=reasoning, ran_out=ran_out)

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
                method, self._target.root + path, headers=self.headers, params=self._target.query or None,
                data=None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8"),
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    detail, code, param = _body_error(raw)
                    raise AttemptFailed(response.status, _retry_after_header(response.headers), detail, code, param)
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
    return _trusting(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.lru_cache(maxsize=None)
def _trusting(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """One context per bundle and process: loading one is slow, and the endpoint check's
    (made while the data loads) then serves the run's first request."""
    if cafile is None and capath is None:
        import certifi

        cafile = certifi.where()
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"cannot load the CA certificates SSL_CERT_FILE/SSL_CERT_DIR name ({error}): fix or unset them") from None


def _body_error(raw: bytes) -> tuple[str, str, str]:
    """The endpoint's own words in an error reply (OpenAI's ``{"error": {"message": …,
    "code": …, "param": …}}``) as ``": words"``, with the error's code and parameter ("" when
    it gives none)."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    code = param = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        message = error.get("message")
        code = error.get("code") if isinstance(error.get("code"), str) else ""  # llama.cpp's is the status
        code = code or str(error.get("type") or "")
        param = str(error.get("param") or "")
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    text = " ".join(str(message or "").split())[:300]
    return (f": {text}" if text else ""), code, param


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


def status_error(status: int, detail: str, base_url: str, model: str) -> UserError:
    if status == 401 and f"{MASK}@" in base_url:  # the URL's user and password went instead of the key
        return UserError(f"the endpoint {base_url} rejected the user and password in its URL (401{detail}): fix them")
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


async def check_endpoint(base_url: str, api_key: str | None, model: str, timeout: float = 10.0) -> None:
    """Fails fast, with the fix in one line, when the endpoint is unreachable, rejects the key
    or does not serve the model. Endpoints without a model list are let through."""
    endpoint = Endpoint(base_url, api_key, timeout)
    base_url = endpoint.base_url  # masked: what the lines below show
    try:
        served = await endpoint.models()
    except AttemptFailed as error:
        if error.status_code == 0:
            raise UserError(
                f"cannot reach the endpoint {base_url}: start the server or fix --base-url (or OPENAI_BASE_URL)"
            ) from None
        if error.status_code in (401, 403):
            raise status_error(error.status_code, error.detail, base_url, model) from None
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
