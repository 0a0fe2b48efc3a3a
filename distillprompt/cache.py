"""Persistent response cache: one sqlite file, keyed by a hash of the full request.

A request that was answered once costs nothing the second time, and a rerun with the same
seed replays the same replies, so it reproduces the run. Every reply is committed as soon
as it arrives: a run that is killed loses none of the replies it paid for.
"""

from __future__ import annotations

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
    sample: str | int = 0,
    stop: tuple[str, ...] = (),
) -> str:
    """The cache key of one request: a SHA-256 over everything that shapes its reply."""
    fields = {
        "endpoint": endpoint.rstrip("/"),
        "model": model,
        "messages": messages,
        "temperature": round(float(temperature), 6),
        "max_tokens": int(max_tokens),
        "n": int(n),
        "sample": str(sample),
    }
    if stop:
        fields["stop"] = list(stop)
    payload = json.dumps(
        fields,
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedReply | None:
        with self._lock:
            row = self._db.execute(
                "SELECT texts, input_tokens, output_tokens FROM replies WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return CachedReply(json.loads(row[0]), row[1], row[2])

    def put(self, key: str, reply: CachedReply) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replies (key, texts, input_tokens, output_tokens, created) VALUES (?, ?, ?, ?, ?)",
                (key, json.dumps(reply.texts, ensure_ascii=False), reply.input_tokens, reply.output_tokens, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        with self._lock:
            self._db.close()
