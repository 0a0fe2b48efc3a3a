"""A scripted, deterministic OpenAI-compatible endpoint for tests and benchmarks.

It speaks HTTP/1.1 on a loopback socket (``/v1/models``, ``/v1/chat/completions``) and
answers like a tiny, predictable model:

* scoring requests (they list "Possible answers:") get ``<ans>label</ans>``; the label is
  right (by a sentiment word list) with a probability that grows with the number of
  helpful words in the instruction, decided by a hash, so the same request always gets the
  same answer;
* meta-prompts (they ask for ``<START>``/``<END>``) get a new instruction built from the
  one they quote, different per stage and per sample, again decided by hashes.

Faults can be injected: a scripted queue (``script``) for exact sequences, or rates per
kind (``rates``) decided by a hash of the request body and how often it was seen, so that a
run under faults is as reproducible as a clean one. ``latency`` and ``capacity`` make it a
slow endpoint that serves at most ``capacity`` requests at once (for benchmarks).

Refusals, with the 400 bodies OpenAI documents: ``reasoning`` answers as OpenAI's reasoning
models do (``max_tokens`` and any temperature but 1 refused; hidden reasoning tokens that
count against ``max_completion_tokens`` and in ``usage.completion_tokens_details``, an empty
reply when they leave no room for the answer), ``refuse_n`` refuses ``n``, ``context``
refuses messages longer than that many tokens (``context_length_exceeded``) and ``flagged``
words trip a content filter (``content_filter``).

Run it alone with ``python -m tests.endpoint --port 8001 --latency 0.2 --capacity 32``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import math
import re
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

POSITIVE = {
    "good", "great", "excellent", "love", "loved", "wonderful", "best", "fun", "delightful", "enjoyable",
    "brilliant", "charming", "superb", "moving", "funny", "beautiful", "fantastic", "perfect", "happy", "fine",
}
NEGATIVE = {
    "bad", "terrible", "awful", "boring", "worst", "hate", "hated", "dull", "poor", "waste", "mess", "stupid",
    "tedious", "ugly", "disappointing", "horrible", "lame", "broken", "sad", "annoying",
}
HELPFUL = ["sentiment", "tone", "overall", "opinion", "emotion", "attitude", "feeling", "polarity"]
HINTS = [
    "Focus on the overall sentiment of the text.",
    "Judge the writer's tone and attitude.",
    "Look at the opinion words, not the plot.",
    "Weigh the emotion the author expresses.",
    "Decide the polarity of the feeling as a whole.",
    "Read carefully before you decide.",
    "Be brief.",
    "Consider the whole text.",
]

Responder = Callable[[dict[str, Any], str, str], "str | None"]


def digest(*parts: Any) -> int:
    text = "\x1f".join(str(part) for part in parts)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def fraction(*parts: Any) -> float:
    return digest(*parts) % 10_000 / 10_000


def request_kind(content: str) -> tuple[str, str]:
    """('scoring'|'meta'|'other', stage) of a request, from the text it carries."""
    # a meta-prompt may quote a candidate that names the answer tags: <START> decides first
    if "<START>" not in content and ("Possible answers:" in content or "<ans>" in content):
        return "scoring", "scoring"
    if "<START>" in content:
        for marker, stage in (
            ("Study the solved examples", "distill"),
            ("Below are examples the model answered", "distill"),
            ("You shorten", "compress"),
            ("You combine", "aggregate"),
            ("You paraphrase parts", "grips_paraphrase"),
            ("You paraphrase", "paraphrase"),
            ("You improve", "rewrite"),
        ):
            if marker in content:
                return "meta", stage
        return "meta", "unknown"
    return "other", "other"


def quoted_instruction(content: str) -> str:
    match = re.search(r"Instruction:\n(.*?)\n\n", content, re.DOTALL)
    return match.group(1).strip() if match else ""


def quoted_instructions(content: str) -> list[str]:
    return [m.strip() for m in re.findall(r"Instruction \d+:\n(.*?)(?=\n\nInstruction \d+:|\n\nWrite only)", content, re.DOTALL)]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def true_label(text: str, labels: list[str]) -> str:
    words = re.findall(r"[a-z']+", text.lower())
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    lowered = [label.lower() for label in labels]
    if "positive" in lowered and "negative" in lowered:
        return labels[lowered.index("positive" if score >= 0 else "negative")]
    return labels[digest(text) % len(labels)]


def scoring_parts(content: str) -> tuple[str, list[str], str]:
    """The instruction, the possible answers and the input of a scoring request."""
    labels_match = re.search(r"Possible answers: (.*?)\.\n", content)
    labels = [label.strip() for label in labels_match.group(1).split(",")] if labels_match else ["yes", "no"]
    instruction = content.split("\n\nPossible answers:")[0]
    # the last input: a prompt with solved examples shows others before it
    inputs = re.findall(r"Input: (.*?)\n\n", content, re.DOTALL)
    text = inputs[-1] if inputs else content
    return instruction, labels, text


def answer_scoring(content: str) -> str:
    instruction, labels, text = scoring_parts(content)
    helpful = sum(word in instruction.lower() for word in HELPFUL)
    quality = min(0.95, 0.45 + 0.1 * helpful)
    right = true_label(text, labels)
    if fraction("answer", instruction, text) < quality:
        label = right
    else:
        others = [label for label in labels if label != right] or labels
        label = others[digest("wrong", instruction, text) % len(others)]
    return f"<ans>{label}</ans>"


class HiddenAccuracy:
    """A target whose every instruction has an accuracy only this endpoint knows, for
    measuring selection: each distinct instruction (white space aside) gets one drawn
    uniformly from ``low``..``high`` by a hash, unless ``pinned`` sets it; its answer to an
    input is right with that probability, decided by a hash, so every request is repeatable.

    ``correlation`` is how much the inputs' difficulty is shared between instructions (the
    correlation of the latent variables of a Gaussian copula): 0 makes every instruction's
    mistakes independent of every other's, larger values make the same inputs hard for
    every instruction, as on real tasks. ``gold`` maps an input text to its label (else the
    sentiment word list decides, as for the reviews the tests write)."""

    def __init__(
        self, low: float = 0.78, high: float = 0.90, correlation: float = 0.0,
        gold: dict[str, str] | None = None, pinned: dict[str, float] | None = None, fresh: bool = False,
    ) -> None:
        self.low, self.high, self.correlation, self.fresh = low, high, correlation, fresh
        self.gold = {" ".join(text.split()): label for text, label in (gold or {}).items()}
        self.pinned = {" ".join(text.split()): value for text, value in (pinned or {}).items()}
        self._normal = NormalDist()

    def accuracy(self, instruction: str) -> float:
        key = " ".join(instruction.split())
        if key in self.pinned:
            return self.pinned[key]
        return self.low + (self.high - self.low) * fraction("hidden accuracy", key)

    def right(self, instruction: str, text: str) -> bool:
        """Whether the instruction's answer to this input is right."""
        shared = self._normal.inv_cdf((fraction("difficulty", text) * 10_000 + 0.5) / 10_001)
        own = self._normal.inv_cdf((fraction("noise", " ".join(instruction.split()), text) * 10_000 + 0.5) / 10_001)
        latent = math.sqrt(self.correlation) * shared + math.sqrt(1 - self.correlation) * own
        return latent < self._normal.inv_cdf(self.accuracy(instruction))

    def __call__(self, request: dict[str, Any], kind: str, stage: str) -> str | None:
        content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
        if kind == "meta" and self.fresh and stage in ("rewrite", "distill", "compress", "aggregate", "paraphrase"):
            # a new instruction every time, as a capable optimizer model writes them
            number = digest(stage, request.get("_sample"), request.get("seed"), content) % 10**8
            return f"<START>Decide whether the text is negative or positive. Take approach {number}.<END>"
        if kind != "scoring":
            return None
        instruction, labels, text = scoring_parts(content)
        truth = self.gold.get(" ".join(text.split())) or true_label(text, labels)
        if self.right(instruction, text):
            return f"<ans>{truth}</ans>"
        others = [label for label in labels if label != truth] or labels
        return f"<ans>{others[digest('wrong', instruction, text) % len(others)]}</ans>"

    @classmethod
    def from_arguments(
        cls, spec: str, correlation: float, gold: str | None, pins: list[str], fresh: bool = False
    ) -> HiddenAccuracy:
        """From the command line: ``LOW:HIGH``, a folder or file of JSONL rows with the gold
        labels, ``ACCURACY=INSTRUCTION`` pins, and whether meta-prompts get a new instruction
        every time (else the scripted writer's, which repeats itself often)."""
        low, high = (float(part) for part in spec.split(":"))
        labels: dict[str, str] = {}
        if gold:
            files = sorted(Path(gold).glob("*.jsonl")) if Path(gold).is_dir() else [Path(gold)]
            for file in files:
                for line in file.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        labels[str(row["text"])] = str(row["label"])
        pinned = {text: float(value) for value, _, text in (pin.partition("=") for pin in pins)}
        return cls(low, high, correlation, labels, pinned, fresh)


SYNONYMS = {"Read": "Study", "text": "passage", "answer": "reply", "label": "category", "best": "most", "the": "this"}


def write_meta(content: str, stage: str, index: int, seed: Any) -> str:
    salt = (stage, index, seed, content)
    if stage == "grips_paraphrase":
        match = re.search(r"Phrase:\n(.*?)\n\n", content, re.DOTALL)
        phrase = match.group(1).strip() if match else ""
        words = [SYNONYMS.get(word, word) for word in phrase.split()]
        return f"<START>{' '.join(words) if words != phrase.split() else phrase + ' carefully'}<END>"
    if stage == "aggregate":
        pieces: list[str] = []
        for instruction in quoted_instructions(content):
            for sentence in sentences(instruction):
                if sentence not in pieces:
                    pieces.append(sentence)
        new = " ".join(pieces[:4])
    else:
        base = quoted_instruction(content)
        parts = sentences(base)
        if stage == "compress":
            new = " ".join(parts[:3])
        elif stage == "paraphrase":
            swaps = [("Read", "Study"), ("answer", "reply"), ("label", "category"), ("text", "passage")]
            old, replacement = swaps[digest(*salt) % len(swaps)]
            new = base.replace(old, replacement, 1) if old in base else base + " Answer with one label."
        else:
            hint = HINTS[digest(*salt) % len(HINTS)]
            new = base if hint in base else f"{base} {hint}".strip()
    return f"<START>{new}<END>"


@dataclass
class Logged:
    kind: str
    stage: str
    n: int
    status: int
    body_hash: str
    time: float
    temperature: float | None = None
    max_tokens: int | None = None
    content: str = ""
    parameters: tuple[str, ...] = ()  # the request's fields, sorted
    refused: str = ""  # a 400's parameter (max_tokens, temperature, n) or reason (context_length, content_filter)
    arrived: int = 0  # order of arrival, and of the answer, on one counter shared by every request
    answered: int = 0
    max_completion_tokens: int | None = None


# what a reasoning model thinks before it answers, in tokens, by kind of request
REASONING_TOKENS = {"scoring": 300, "meta": 1200, "other": 20}
UNSUPPORTED_MAX_TOKENS = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                          "Use 'max_completion_tokens' instead.")
CONTENT_FILTER_MESSAGE = ("The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
                          "Please modify your prompt and retry.")


def openai_error(message: str, param: str | None, code: str, kind: str | None = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ScriptedEndpoint:
    models: list[str] = field(default_factory=lambda: ["test-model"])
    api_key: str | None = None
    support_n: bool = True
    latency: float = 0.0
    capacity: int = 0  # 0: unbounded
    script: list[str] = field(default_factory=list)  # "429", "429:2" (Retry-After 2 s), "500", "drop", "garbage", "empty", "tagless", "ok"
    rates: dict[str, float] = field(default_factory=dict)  # same names, as fractions of all requests
    responder: Responder | None = None
    # answer 429 at once to a request that arrives while this many are being served (0: never),
    # like a provider's undisclosed concurrency limit; with Retry-After when throttle_retry_after
    throttle: int = 0
    throttle_retry_after: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    tls: Any = None  # an ssl.SSLContext: serve HTTPS
    reasoning: bool = False  # refuse and answer as OpenAI's reasoning models do (module docstring)
    refuse_n: bool = False  # 400 for a request that carries n
    context: int = 0  # tokens (characters / 4) of messages beyond which a request is refused (0: no limit)
    flagged: tuple[str, ...] = ()  # words a content filter refuses a request for
    # (user, password) that every request's Authorization header must carry as HTTP basic
    # auth, as a proxy in front of an endpoint asks (in place of the key's bearer token)
    basic_auth: tuple[str, str] | None = None
    query: dict[str, str] = field(default_factory=dict)  # parameters every request's URL must carry (a token)

    def __post_init__(self) -> None:
        self.log: list[Logged] = []
        self.counts: Counter[str] = Counter()
        self._seen: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._limit: asyncio.Semaphore | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        self.served: list[tuple[float, float, str]] = []  # (start, end, stage) of every request served, 429s included
        self._order = itertools.count(1)  # arrivals and answers, in order

    # ----- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/v1"

    def start(self) -> ScriptedEndpoint:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._limit = asyncio.Semaphore(self.capacity) if self.capacity else None
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, backlog=1024, ssl=self.tls)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="scripted-endpoint", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            self._loop.stop()  # type: ignore[union-attr]

        asyncio.run_coroutine_threadsafe(close(), self._loop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> ScriptedEndpoint:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.counts.clear()
            self._seen.clear()
            self.served.clear()

    def requests(self, kind: str | None = None, stage: str | None = None, status: int | None = 200) -> list[Logged]:
        with self._lock:
            return [
                entry
                for entry in self.log
                if (kind is None or entry.kind == kind)
                and (stage is None or entry.stage == stage)
                and (status is None or entry.status == status)
            ]

    # ----- HTTP --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                method, path, _ = request_line.decode("latin1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._respond(method, path, headers, body, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
        head = [f"HTTP/1.1 {status} {reasons.get(status, 'Status')}", "Content-Type: application/json", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    def _authorized(self, headers: dict[str, str], query: str) -> bool:
        if self.basic_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
            if headers.get("authorization") != expected:
                return False
        elif self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return False
        given = dict(urllib.parse.parse_qsl(query))
        return all(given.get(name) == value for name, value in self.query.items())

    async def _respond(self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        path, _, query = path.partition("?")
        if not self._authorized(headers, query):
            await self._send(writer, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            return True
        if method == "GET" and path.rstrip("/").endswith("/stats"):
            await self._send(writer, 200, self.stats())
            return True
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._send(writer, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            await self._send(writer, 404, {"error": {"message": f"no route {path}"}})
            return True
        request = json.loads(body or b"{}")
        if request.get("model") not in self.models:
            await self._send(writer, 404, {"error": {"message": f"model {request.get('model')} not found"}})
            return True
        arrived = next(self._order)
        if self._limit is not None:
            async with self._limit:
                return await self._complete(request, body, writer, arrived)
        return await self._complete(request, body, writer, arrived)

    def _fault(self, body: bytes) -> str:
        body_hash = hashlib.sha256(body).hexdigest()
        with self._lock:
            if self.script:
                return self.script.pop(0)
            attempt = self._seen[body_hash]
            self._seen[body_hash] += 1
        position = fraction("fault", body_hash, attempt)
        for name, rate in self.rates.items():
            if position < rate:
                return name
            position -= rate
        return "ok"

    def stats(self) -> dict[str, Any]:
        """When the endpoint was busy (at least one request being served): the union of the
        requests' service intervals, the idle gaps between them, the first start and last end."""
        with self._lock:
            spans = sorted(self.served)
            counts = dict(self.counts)
        busy, gaps, start, end, previous = 0.0, [], None, None, ""
        for begin, finish, stage in spans:
            if end is None or begin > end:
                if end is not None:
                    gaps.append((begin - end, begin - spans[0][0], previous, stage))
                busy += 0.0 if start is None else end - start
                start, end = begin, finish
            else:
                end = max(end, finish)
            previous = stage
        if start is not None:
            busy += end - start
        return {
            "requests": len(spans), "counts": counts, "busy_s": busy, "idle_gaps_s": sum(gap[0] for gap in gaps),
            # the longest gaps: seconds, when (since the first request), between which stages
            "longest_gaps": sorted(gaps, reverse=True)[:10], "first_start": spans[0][0] if spans else None,
            "last_end": max((finish for _, finish, _ in spans), default=None), "peak_in_flight": self.peak_in_flight,
        }

    def _refusal(self, request: dict[str, Any], content: str) -> tuple[str, dict[str, Any]] | None:
        """What the endpoint refuses this request for, and the 400 body it answers (OpenAI's
        documented ones; Azure's for the content filter), or None."""
        if self.reasoning and "max_tokens" in request:
            return "max_tokens", openai_error(UNSUPPORTED_MAX_TOKENS, "max_tokens", "unsupported_parameter")
        temperature = request.get("temperature")
        if self.reasoning and temperature is not None and float(temperature) != 1.0:
            message = (f"Unsupported value: 'temperature' does not support {float(temperature)} with this model. "
                       "Only the default (1) value is supported.")
            return "temperature", openai_error(message, "temperature", "unsupported_value")
        if self.refuse_n and "n" in request:
            return "n", openai_error("Unsupported parameter: 'n' is not supported with this model.", "n",
                                     "unsupported_parameter")
        tokens = max(1, len(content) // 4)
        if self.context and tokens > self.context:
            message = (f"This model's maximum context length is {self.context} tokens. However, your messages resulted "
                       f"in {tokens} tokens. Please reduce the length of the messages.")
            return "context_length", openai_error(message, "messages", "context_length_exceeded")
        words = set(re.findall(r"[a-z']+", content.lower()))
        if any(word in words for word in self.flagged):
            return "content_filter", {"error": {**openai_error(CONTENT_FILTER_MESSAGE, "prompt", "content_filter", None)[
                "error"], "status": 400}}
        return None

    async def _complete(self, request: dict[str, Any], body: bytes, writer: asyncio.StreamWriter, arrived: int = 0) -> bool:
        started = time.time()
        content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
        kind, stage = request_kind(content)
        if self.throttle and self.in_flight >= self.throttle:
            extra = {"Retry-After": self.throttle_retry_after} if self.throttle_retry_after else None
            await self._send(writer, 429, {"error": {"message": "too many requests in flight"}}, extra)
            self._record(kind, stage, int(request.get("n") or 1), 429, body, request, content, arrived=arrived)
            with self._lock:
                self.served.append((started, time.time(), stage))
            return True
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            refusal = self._refusal(request, content)
            if refusal is not None:
                self._record(kind, stage, int(request.get("n") or 1), 400, body, request, content, refusal[0], arrived)
                await self._send(writer, 400, refusal[1])
                return True
            fault = self._fault(body)
            n = int(request.get("n") or 1)
            status = 200
            if fault.startswith("429"):
                status = 429
                retry_after = fault.partition(":")[2]
                await self._send(writer, 429, {"error": {"message": "slow down"}}, {"Retry-After": retry_after} if retry_after else None)
            elif fault == "500":
                status = 500
                await self._send(writer, 500, {"error": {"message": "boom"}})
            elif fault in ("drop", "garbage"):
                status = 0
            self._record(kind, stage, n, status, body, request, content, arrived=arrived)
            if fault == "garbage":  # not HTTP at all: a broken proxy or server
                writer.write(b"SPAM 12 not a status line\r\n\r\n")
                await writer.drain()
            if status == 0:
                writer.transport.abort()
                return False
            if status != 200:
                return True
            count = n if self.support_n else 1
            texts = [self._text(request, content, kind, stage, i, fault) for i in range(count)]
            prompt_tokens = max(1, len(content) // 4)
            finish = ["stop"] * len(texts)
            completion = [max(1, len(t) // 4) for t in texts]
            thought = [0] * len(texts)
            if self.reasoning:  # hidden reasoning first, within max_completion_tokens: no room left, no answer
                limit = int(request.get("max_completion_tokens") or 1_000_000)
                for i, tokens in enumerate(completion):
                    thought[i] = min(limit, REASONING_TOKENS[kind])
                    if thought[i] + tokens > limit:
                        texts[i], finish[i], completion[i] = "", "length", 0
                    completion[i] += thought[i]
            usage: dict[str, Any] = {
                "prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
                "total_tokens": prompt_tokens + sum(completion),
            }
            if self.reasoning:
                usage["completion_tokens_details"] = {"reasoning_tokens": sum(thought)}
            await self._send(
                writer,
                200,
                {
                    "id": f"cmpl-{digest(body, time.time())}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [
                        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish[i]}
                        for i, t in enumerate(texts)
                    ],
                    "usage": usage,
                },
            )
            return True
        finally:
            self.in_flight -= 1
            with self._lock:
                self.served.append((started, time.time(), stage))

    def _record(
        self, kind: str, stage: str, n: int, status: int, body: bytes, request: dict[str, Any], content: str,
        refused: str = "", arrived: int = 0,
    ) -> None:
        entry = Logged(
            kind, stage, n, status, hashlib.sha256(body).hexdigest(), time.time(),
            request.get("temperature"), request.get("max_tokens"), content, tuple(sorted(request)), refused, arrived,
            next(self._order), request.get("max_completion_tokens"),
        )
        with self._lock:
            self.log.append(entry)
            self.counts[f"{kind}:{status}"] += 1

    def _text(self, request: dict[str, Any], content: str, kind: str, stage: str, index: int, fault: str) -> str:
        if fault == "empty":
            return ""
        # which of the n samples this is, for responders that vary their samples
        scripted = self.responder({**request, "_sample": index}, kind, stage) if self.responder else None
        if scripted is not None:
            text = scripted
        elif kind == "scoring":
            text = answer_scoring(content)
        elif kind == "meta":
            text = write_meta(content, stage, index, request.get("seed"))
        else:
            text = "OK"
        if fault == "tagless":
            text = re.sub(r"</?ans>|<START>|<END>", "", text)
        for stop in request.get("stop") or []:  # like real servers: the stop sequence ends the reply, unseen
            if stop in text:
                text = text[: text.index(stop)]
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible endpoint for tests and benchmarks.")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each request waits")
    parser.add_argument("--capacity", type=int, default=0, help="requests served at once (0: no bound)")
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--no-n", action="store_true", help="ignore n, like llama.cpp's server")
    parser.add_argument("--fault", action="append", default=[], help="NAME=RATE, e.g. 429=0.1 500=0.05 drop=0.05")
    parser.add_argument("--throttle", type=int, default=0, help="429 at once above this many requests in flight")
    parser.add_argument("--throttle-retry-after", default="", help="Retry-After header of those 429s (none by default)")
    parser.add_argument("--hidden-accuracy", metavar="LOW:HIGH", help="each instruction's accuracy, drawn from this range")
    parser.add_argument("--correlation", type=float, default=0.0, help="hidden accuracy: difficulty shared by instructions")
    parser.add_argument("--gold", help="hidden accuracy: JSONL file or folder with each input's label")
    parser.add_argument("--pin", action="append", default=[], metavar="ACCURACY=INSTRUCTION",
                        help="hidden accuracy: the accuracy of one instruction")
    parser.add_argument("--fresh-prompts", action="store_true", help="hidden accuracy: a new instruction every meta reply")
    parser.add_argument("--capable", action="store_true", help="meta replies in a capable model's style (tests/capable.py)")
    parser.add_argument("--reasoning", action="store_true",
                        help="refuse max_tokens and temperatures but 1, and think before answering, as OpenAI's reasoning models do")
    parser.add_argument("--refuse-n", action="store_true", help="400 for a request that carries n")
    parser.add_argument("--context", type=int, default=0, help="refuse messages longer than this many tokens (0: no limit)")
    parser.add_argument("--flag", action="append", default=[], metavar="WORD", help="a word a content filter refuses")
    args = parser.parse_args()
    rates = {name: float(rate) for name, rate in (item.split("=") for item in args.fault)}
    responder = (
        HiddenAccuracy.from_arguments(args.hidden_accuracy, args.correlation, args.gold, args.pin, args.fresh_prompts)
        if args.hidden_accuracy else None
    )
    if args.capable:
        from tests.capable import CapableModel

        responder = CapableModel()
    endpoint = ScriptedEndpoint(
        models=args.model or ["test-model"], support_n=not args.no_n, latency=args.latency,
        capacity=args.capacity, rates=rates, port=args.port, throttle=args.throttle,
        throttle_retry_after=args.throttle_retry_after, responder=responder, reasoning=args.reasoning,
        refuse_n=args.refuse_n, context=args.context, flagged=tuple(args.flag),
    ).start()
    print(f"serving {endpoint.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        endpoint.stop()


if __name__ == "__main__":
    main()
