"""Persistent response cache: one sqlite file, keyed by a hash of the full request.

A request that was answered once costs nothing the second time, and a rerun with the same
seed replays the same replies, so it reproduces the run.

Writes are group commits: the replies that arrive in one turn of the event loop (a batch
back from a Ray actor, or the replies that came in together) are written in one
transaction at the end of that turn, so a run that is killed loses none of the replies it
had received and a stage of thousands of replies does not pay a commit for each. Look-ups
for a whole stage are one query (``get_many``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


def request_key(
    *,
    endpoint: str,
    model: str,
    messages: list[dict[str, str]],
    temperature: float,
    max_tokens: int,
    n: int,
    salt: str | int = 0,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
) -> str:
    """The cache key of one request: a SHA-256 over everything that shapes its reply, the
    sampling seed sent with it included (requests without one keep the keys they had), and
    a ``salt`` that tells apart requests otherwise alike (several takes on one meta-prompt).
    The salt's field keeps its first name, "sample", so that existing caches still answer."""
    fields = {
        "endpoint": endpoint.rstrip("/"),
        "model": model,
        "messages": messages,
        "temperature": round(float(temperature), 6),
        "max_tokens": int(max_tokens),
        "n": int(n),
        "sample": str(salt),
    }
    if stop:
        fields["stop"] = list(stop)
    if seed is not None:
        fields["seed"] = int(seed)
    payload = json.dumps(
        fields,
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


QUERY_KEYS = 500  # keys per look-up query (SQLite allows 32,766 parameters since 3.32)


@dataclass(frozen=True)
class CachedReply:
    texts: list[str]
    input_tokens: int
    output_tokens: int


class ResponseCache:
    """A sqlite-backed map from request key to reply texts and their token usage.

    Safe for concurrent use from the threads and tasks of one process (one connection
    behind a lock), and tolerant of other processes using the same file (WAL journal,
    busy timeout).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies ("
                " key TEXT PRIMARY KEY, texts TEXT NOT NULL,"
                " input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,"
                " created REAL NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise UserError(
                f"cannot open the response cache at {self.path} ({exc}): pass a writable --cache-path or --no-cache"
            ) from None
        self._lock = threading.RLock()
        self._pending: dict[str, CachedReply] = {}  # written at the end of this turn of the event loop
        self.transactions = 0  # write transactions committed (one per group of replies)
        self._scheduled = False  # a flush waits for the end of this turn of an event loop
        self._failure: UserError | None = None  # a flush at a turn's end failed: the next put says so
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedReply | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, CachedReply]:
        """The cached replies of these keys (missing keys are absent), in one query per
        ``QUERY_KEYS`` keys; each key counts as a hit or a miss."""
        found: dict[str, CachedReply] = {}
        with self._lock:
            for key in keys:
                if key in self._pending:
                    found[key] = self._pending[key]
            wanted = list(dict.fromkeys(key for key in keys if key not in found))
            for start in range(0, len(wanted), QUERY_KEYS):
                chunk = wanted[start : start + QUERY_KEYS]
                rows = self._db.execute(
                    "SELECT key, texts, input_tokens, output_tokens FROM replies WHERE key IN"
                    f" ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for key, texts, input_tokens, output_tokens in rows:
                    found[key] = CachedReply(json.loads(texts), input_tokens, output_tokens)
            hits = sum(key in found for key in keys)
            self.hits += hits
            self.misses += len(keys) - hits
        return found

    def put(self, key: str, reply: CachedReply) -> None:
        """Keeps a reply; inside an event loop it is written with the others of this turn
        of the loop, elsewhere at once. A write that failed is reported here, by the next
        reply (the replies it held are kept and written with the next group)."""
        with self._lock:
            self._pending[key] = reply
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop in this thread: nothing to group with
                self.flush()
                return
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush_at_turn_end)

    def _flush_at_turn_end(self) -> None:
        with self._lock:
            self._scheduled = False
            try:
                self.flush()
            except UserError as failure:  # a callback cannot raise to the run: the next put does
                self._failure = failure

    def flush(self) -> None:
        """Writes the replies kept since the last flush, in one transaction; on failure they
        stay kept, and a UserError names the fix."""
        with self._lock:
            if not self._pending:
                return
            now = time.time()
            rows = [
                (key, json.dumps(reply.texts, ensure_ascii=False), reply.input_tokens, reply.output_tokens, now)
                for key, reply in self._pending.items()
            ]
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO replies (key, texts, input_tokens, output_tokens, created)"
                        " VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as error:
                raise UserError(
                    f"cannot write the response cache at {self.path} ({error}): free disk space or pass another "
                    "--cache-path (a rerun with it replays what was written)"
                ) from None
            self._pending.clear()
            self.transactions += 1

    def __len__(self) -> int:
        with self._lock:
            self.flush()
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "write_transactions": self.transactions}

    def close(self) -> None:
        with self._lock:
            try:
                self.flush()
            finally:
                self._db.close()
