"""How closely a run keeps to the pace an endpoint sets: --rpm, a Retry-After that holds every
new request, and a client's wait for one. Reported as ratios to what was asked, so that a
slower or busier machine reads the same; the tests check the rules without a clock
(tests/test_throughput.py).

    python benchmarks/pacing.py                  # --rpm 300 over 60 requests, Retry-After 2 s
    python benchmarks/pacing.py --repeat 3

Against the scripted endpoint (tests/endpoint.py) in this process, each run a whole
`distillprompt evaluate` process (--executor local, --no-cache):

* **--rpm**: the most requests the endpoint received in any one second, against what a
  second allows (a second's rate plus the first full bucket of a second's worth); the time
  from the first request to the last, against the least the rate allows for the requests
  after the first bucket (a ratio of at least 1 keeps to the rate).
* **Retry-After**: the first reply is 429 with Retry-After; the requests started before
  the wait was over beyond those already in flight (0 keeps to it), and the first new
  request's wait against the Retry-After asked for.
* **The client's own wait** (one ChatClient): the time between the 429 and the retry,
  against the Retry-After asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distillprompt.llm import ChatClient, PriorityLimiter, UsageMeter  # noqa: E402
from tests.conftest import review_rows, run_cli, write_jsonl  # noqa: E402
from tests.endpoint import ScriptedEndpoint  # noqa: E402

MESSAGES = [{"role": "user", "content": "Classify it.\n\nPossible answers: negative, positive.\n\nInput: a great film"}]


def evaluate(url: str, data: Path, *options: str) -> None:
    done = run_cli("evaluate", "--prompt", "Classify the sentiment.", "--dataset", str(data), "--base-url", url,
                   "--model", "test-model", "--executor", "local", "--no-cache", *options)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])


def rpm(data: Path, rate: int, requests: int) -> dict[str, float]:
    with ScriptedEndpoint() as fast:
        evaluate(fast.base_url, data, "--test-size", str(requests), "--concurrency", "16", "--rpm", str(rate))
        times = sorted(entry.time for entry in fast.requests(kind="scoring"))
    per_second = rate / 60
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    least = (len(times) - per_second) / per_second  # the first bucket's worth goes at once
    return {"busiest second / allowed": busiest / (2 * per_second),
            "first to last / least": (times[-1] - times[0]) / least}


def retry_after(data: Path, wait: float, in_flight: int) -> dict[str, float]:
    with ScriptedEndpoint(latency=0.05, script=[f"429:{wait:g}"]) as endpoint:
        evaluate(endpoint.base_url, data, "--test-size", "20", "--concurrency", str(in_flight))
        log = endpoint.requests(status=None)
    refused = next(entry.time for entry in log if entry.status == 429)
    later = sorted(entry.time for entry in log if entry.status == 200 and entry.time > refused)
    early = sum(1 for t in later if t < refused + wait) - (in_flight - 1)  # those in flight when the 429 came
    new = later[in_flight - 1] if len(later) >= in_flight else float("nan")
    return {"new requests before the wait was over": max(0, early),
            "first new request's wait / asked": (new - refused) / wait}


def client_wait(wait: float) -> dict[str, float]:
    async def ask(endpoint: ScriptedEndpoint) -> None:
        client = ChatClient(base_url=endpoint.base_url, api_key=endpoint.api_key, model="test-model",
                            limiter=PriorityLimiter(4), meter=UsageMeter(), backoff_base=0.0, backoff_max=0.0)
        try:
            await client.complete(MESSAGES, temperature=0.0, max_tokens=20)
        finally:
            await client.aclose()

    with ScriptedEndpoint(script=[f"429:{wait:g}"]) as endpoint:
        asyncio.run(ask(endpoint))
        first, second = endpoint.requests(status=None)
    return {"the client's retry wait / asked": (second.time - first.time) / wait}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=300)
    parser.add_argument("--requests", type=int, default=60, help="test examples of the --rpm run")
    parser.add_argument("--retry-after", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        data = Path(temp)
        write_jsonl(data / "train.jsonl", review_rows(80, seed=1))
        write_jsonl(data / "test.jsonl", review_rows(max(args.requests, 20), seed=2))
        rows = []
        for _ in range(args.repeat):
            rows.append({**rpm(data, args.rpm, args.requests), **retry_after(data, args.retry_after, 4),
                         **client_wait(args.retry_after / 2)})
    names = list(rows[0])
    print("| " + " | ".join(names) + " |")
    print("|" + "---:|" * len(names))
    for row in rows:
        print("| " + " | ".join(f"{row[name]:.2f}" for name in names) + " |")


if __name__ == "__main__":
    main()
