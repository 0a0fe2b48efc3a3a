"""URLs that carry credentials: ``http://user:password@host/v1`` (basic auth, e.g. through a
proxy) or a token in the query (``?api-key=…``, ``?token=…``, ``sig=…``).

``masked`` is the one masking of the package: every URL that is printed, logged or recorded
(settings, params, tags, artifacts, the registered model's config, error lines, log lines)
goes through it. ``request_parts`` splits a URL for an HTTP client that sends the credentials.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.request
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# a URL with a scheme, up to white space or a quote; a closing bracket or punctuation that
# ends a sentence is not part of it
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`).,;:]")
# query (or fragment) parameters whose value is a secret, by their name
_SECRET_NAME = re.compile(r"key|token|sig|secret|pass|pwd|auth|cred|session|code", re.IGNORECASE)
_PARAMETER = re.compile(r"([?&#;])([^=&#;]+)=([^&#;]*)")


def masked(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: the user part
    (``user:password@``) and the value of every query or fragment parameter whose name says
    it is a secret. A text without such a URL comes back unchanged."""
    return _URL.sub(lambda match: _mask_url(match.group(0)), text)


def _mask_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    end = min((rest.index(mark) for mark in "/?#" if mark in rest), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = MASK + "@" + authority.rpartition("@")[2]
    tail = _PARAMETER.sub(
        lambda m: f"{m[1]}{m[2]}={MASK}" if m[3] and _SECRET_NAME.search(m[2]) else m[0], tail
    )
    return f"{scheme}://{authority}{tail}"


@dataclass(frozen=True)
class RequestParts:
    """A URL as an HTTP client sends it: the address without the user part and the query, the
    query's parameters (sent with every request), and the ``Authorization`` header that the
    user part makes (HTTP basic auth; None without one)."""

    root: str
    query: list[tuple[str, str]]
    authorization: str | None


def request_parts(url: str) -> RequestParts:
    parts = urlsplit(url)
    authorization = None
    if "@" in parts.netloc:
        user, _, password = parts.netloc.rpartition("@")[0].partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    root = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")).rstrip("/")
    return RequestParts(root, parse_qsl(parts.query, keep_blank_values=True), authorization)


def get_request(url: str, path: str) -> urllib.request.Request:
    """A GET of ``path`` below ``url`` for urllib, the URL's credentials sent as headers and
    query (urllib itself refuses a user part)."""
    parts = request_parts(url)
    query = f"?{urlencode(parts.query)}" if parts.query else ""
    headers = {"Authorization": parts.authorization} if parts.authorization else {}
    return urllib.request.Request(parts.root + path + query, headers=headers)


class MaskedLines(logging.Filter):
    """Masks the URLs of a log record's message (a library's, which names the URL it called)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = masked(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True


def mask_log_lines(logger: str | None = None) -> None:
    """Every line the handlers of ``logger`` (the root logger by default) write has its URLs masked."""
    for handler in logging.getLogger(logger).handlers:
        if not any(isinstance(existing, MaskedLines) for existing in handler.filters):
            handler.addFilter(MaskedLines())
