"""The tracker's MLflow calls, off the optimizer's path.

The loop hands each event's calls to an ``Outbox`` and goes on; one thread of the outbox makes
them in order. When a call fails, the outbox holds it and everything after it, and probes the
server (its ``/health``, every ``PROBE_EVERY`` seconds) instead of paying MLflow's retry
schedule on every call; once the server answers, the held call is made again and the rest
follow. At the run's end ``close`` waits for the calls left, and for a server that stopped
answering at most ``wait`` seconds from when it stopped; then it gives up, and ``lost`` says why.

Only an outage is waited for: a call that could not reach the server or got a 5xx
(``is_outage``). Any other error (a call the server refused, a bug in the call itself) is
reported once with its traceback, that one call is left out (``faults``), and the calls
after it still go out: waiting would not change its answer.

Why a queue of our own and not MLflow's asynchronous logging (``MLFLOW_ENABLE_ASYNC_LOGGING``):
that covers metrics, params and tags only, while a round also logs a candidate table and a
checkpoint, and the run's end plots, artifacts and registry calls; it retries each batch on the
full schedule and, once a batch fails, raises at the run's end with that batch dropped; and it
never tells whether the server is back. The measurements are in benchmarks/README.md
("A tracking server that goes away").
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import requests

from distillprompt.errors import UserError
from distillprompt.urls import get_request, masked

log = logging.getLogger(__name__)

PROBE_EVERY = 2.0  # seconds between two probes of a server that stopped answering
ATTEMPTS = 3  # a call that fails this often while the server answers is a fault of its own (the registry refuses)


def error_line(error: BaseException) -> str:
    """An error on one short line: its type and message, white space folded, URLs masked, at
    most 200 characters."""
    return masked(" ".join(f"{type(error).__name__}: {error}".split()))[:200]


def is_outage(error: BaseException) -> bool:
    """Whether a failed MLflow call means the server is away: the call did not reach it (a
    connection or a timeout failed, or MLflow's HTTP retries ran out on them or on 5xx
    answers, which it reports as an internal error), or the server answered with a 5xx."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                          TimeoutError, urllib.error.URLError)):
        return True
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500
    return False


def unanswered(uri: str, timeout: float) -> str | None:
    """Why the HTTP tracking server at ``uri`` does not answer its ``/health`` now, or None when
    it does: the one probe of a server, at the start of a run and while a call is held."""
    try:
        with urllib.request.urlopen(get_request(uri, "/health"), timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        # it answers, if not on that route (404) or not to us (401, 403); a 5xx is a proxy or
        # a gateway in front of a server that is down (502, 503, 504), or a server that fails
        return None if error.code < 500 else f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def answers(uri: str) -> bool:
    """Whether an HTTP tracking server answers now. A local store (a file, sqlite) has no probe:
    the held call itself is tried again."""
    if not uri.startswith(("http://", "https://")):
        time.sleep(PROBE_EVERY)
        return True
    return unanswered(uri, PROBE_EVERY) is None


class Outbox:
    def __init__(self, uri: str, *, wait: float, attach: Callable[[], None], name: str = "mlflow-tracking") -> None:
        self.uri = uri
        self.wait = wait
        self.lost: str | None = None  # why the outbox gave up, with the calls it held unmade
        self.failed: str | None = None  # the call it gave up at
        # whether the call being made failed before: it may have reached the server all the
        # same (the answer was lost), so a call that would add a record twice checks first
        self.replaying = False
        self._attach = attach  # makes the run active in the outbox's thread (MLflow's active run is per thread)
        self._calls: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self._busy_since: float | None = None  # when the call being made started (None: none is)
        self._stopped: float | None = None  # when the server stopped answering (None: it answers)
        self.faults: list[tuple[str, str]] = []  # (call, error) of the calls left out: not an outage
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, name: str, call: Callable[[], None]) -> None:
        with self._ready:
            if self.lost is None:
                self._calls.append((name, call))
                self._ready.notify()

    def close(self) -> str | None:
        """Waits for the calls left (while the server answers, as long as they take); returns
        why tracking was lost, or None when every call was made."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._calls:
            log.info("recording the last %d MLflow calls", len(self._calls))
        while self._thread.is_alive():
            self._thread.join(0.5)
            # since when the server has not answered: an outage the thread saw, or a call that
            # hangs while the server's /health does not answer either (a server that takes
            # connections and never replies: each attempt would wait out MLflow's timeout); a
            # call that is only slow (a large artifact) on a server that answers is waited for
            stopped = self._stopped
            busy = self._busy_since
            if stopped is None and busy is not None and time.monotonic() - busy > self.wait and not answers(self.uri):
                stopped = busy
            held = list(self._calls)
            if stopped is not None and held and time.monotonic() - stopped > self.wait + 2 * PROBE_EVERY:
                # the thread is stuck in a call to a server that does not answer: leave it
                self._give_up(f"the tracking server did not answer for {self.wait:.0f} s (--tracking-wait)")
                self.failed = self.failed or held[0][0]
                break
        return self.lost

    def pending(self) -> list[str]:
        return [name for name, _ in self._calls]

    # ----- the outbox's thread -------------------------------------------------------------

    def _work(self) -> None:
        attached = False
        failures = 0  # of the held call, while the server answered
        while True:
            with self._ready:
                while not self._calls and not self._closing:
                    self._ready.wait()
                if not self._calls or self.lost is not None:
                    return
                name, call = self._calls[0]
            try:
                if not attached:
                    self._attach()
                    attached = True
                self.replaying = self.failed is not None
                self._busy_since = time.monotonic()
                call()
            except Exception as error:  # noqa: BLE001 - whatever the server, the network or the registry did
                self._busy_since = None
                reason = error_line(error)
                self.failed = name
                if isinstance(error, UserError):
                    self._give_up(str(error))
                    return
                if not is_outage(error):
                    # the server answered, and would answer the same again: report it with its
                    # traceback, leave this call out and go on with the rest of the record
                    log.error("MLflow tracking failed in %s (%s); that part of the record is left out, the rest "
                              "goes on", name, reason, exc_info=error)
                    self.faults.append((name, reason))
                    self.failed = None
                    with self._ready:
                        self._calls.popleft()
                    continue
                if self._stopped is None:
                    self._stopped = time.monotonic()
                    log.warning("MLflow tracking failed in %s (%s); the run goes on, and its record waits until "
                                "the server answers again", name, reason)
                if not self._await_server(reason):
                    return
                failures += 1
                if failures >= ATTEMPTS:
                    self._give_up(f"failed {failures} times while the server answered: {reason}")
                    return
                continue
            self._busy_since = None
            if self._stopped is not None:
                self._stopped = None
                log.warning("MLflow tracking is back; recording what it missed")
            failures = 0
            self.failed = None
            with self._ready:
                self._calls.popleft()

    def _await_server(self, reason: str) -> bool:
        """Probes the server until it answers (True), or until the run has ended and it has not
        answered for ``wait`` seconds (False: tracking is lost)."""
        while True:
            stopped = self._stopped if self._stopped is not None else time.monotonic()
            if self._closing and time.monotonic() - stopped > self.wait:
                self._give_up(reason)
                return False
            if answers(self.uri):
                return True
            time.sleep(PROBE_EVERY)

    def _give_up(self, reason: str) -> None:
        with self._ready:
            if self.lost is None:
                self.lost = reason
