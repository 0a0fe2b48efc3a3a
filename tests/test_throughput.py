"""How fast a run may send: --concurrency auto against an endpoint that throttles, requests per
minute and Retry-After. The rules are checked here without a clock; how closely whole runs keep
to them, in time, is measured by benchmarks/pacing.py."""

from __future__ import annotations

import json

import pytest

from distillprompt.llm import RateBudget
from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint


def optimize(url: str, reviews_dir, folder, *options: str):
    completed = run_cli(
        "optimize", "--dataset", str(reviews_dir), "--base-url", url, "--model", "test-model", "--executor", "local",
        "--epochs", "1", "--train-size", "24", "--test-size", "12", "--no-cache", "--backoff-base", "0.05",
        "--output", str(folder), *options,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads((folder / "result.json").read_text())


def test_auto_concurrency_finds_the_limit_of_an_endpoint_that_throttles(reviews_dir, tmp_path):
    """An endpoint that answers 429 above 6 requests in flight (it does not say so): auto starts
    at 16, backs off to about 6 and stays there, and the run ends as a run told 6 does."""
    with ScriptedEndpoint(latency=0.1, throttle=6) as throttling:
        auto = optimize(throttling.base_url, reviews_dir, tmp_path / "auto", "--concurrency", "auto")
        refused = throttling.counts["scoring:429"] + throttling.counts["meta:429"]
        answered = throttling.counts["scoring:200"] + throttling.counts["meta:200"]
        throttling.reset()
        fixed = optimize(throttling.base_url, reviews_dir, tmp_path / "fixed", "--concurrency", "6")
        assert throttling.counts["scoring:429"] + throttling.counts["meta:429"] == 0
    assert auto["final_prompt"] == fixed["final_prompt"]
    assert [c["prompt"] for c in auto["history"]] == [c["prompt"] for c in fixed["history"]]
    # every 429 is counted, and they are few: the first burst, then the probes above the limit
    assert auto["usage"]["total"]["throttled"] == refused > 0
    assert refused <= 0.15 * answered, (refused, answered)
    (round_one,) = auto["rounds"]
    assert round_one["usage"]["throttled"] <= refused
    assert 3 <= round_one["concurrency"]["limit"] <= 8  # it found the endpoint's limit
    assert round_one["concurrency"]["peak"] >= 6


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_budget_spaces_requests_and_tokens():
    clock = Clock()
    budget = RateBudget(rpm=120, tpm=600, clock=clock)  # 2 requests and 10 tokens a second; buckets of that size
    assert budget.delay(5) == 0.0
    budget.take(5)
    assert budget.delay(5) == 0.0  # 1 request and 5 tokens left
    budget.take(5)
    # both buckets are empty: a request of 5 tokens waits for 0.5 s of either refill
    assert budget.delay(5) == pytest.approx(0.5)
    # a request larger than the token bucket waits for a full bucket (1 s), then may take it below 0
    assert budget.delay(50) == pytest.approx(1.0)
    clock.now += 0.6
    assert budget.delay(5) == 0.0


def test_requests_per_minute_are_never_exceeded():
    """--rpm 300 (5 a second): 60 requests, each sent as soon as the budget lets it, fill no
    second beyond a second's rate plus the first full bucket, and take at least the time the
    rate allows after that bucket (how closely a whole run keeps to it: benchmarks/pacing.py)."""
    clock = Clock()
    budget = RateBudget(rpm=300, clock=clock)
    sent = []
    for _ in range(60):
        clock.now += budget.delay(1)
        budget.take(1)
        sent.append(clock.now)
    assert max(sum(1 for t in sent if start <= t < start + 1.0) for start in sent) <= 10
    assert sent[-1] - sent[0] == pytest.approx((60 - 5) / 5)


def test_a_429_with_retry_after_is_counted_and_every_example_still_scored(reviews_dir, tmp_path):
    """The first reply is 429 with Retry-After: 1; the request is sent again and the run
    scores every example (how long new requests are held: benchmarks/pacing.py)."""
    with ScriptedEndpoint(latency=0.05, script=["429:1"]) as endpoint:
        completed = run_cli(
            "evaluate", "--prompt", "Classify the sentiment.", "--dataset", str(reviews_dir), "--base-url",
            endpoint.base_url, "--model", "test-model", "--executor", "local", "--test-size", "20", "--no-cache",
            "--concurrency", "4",
        )
        assert completed.returncode == 0, completed.stderr
        statuses = [entry.status for entry in endpoint.requests(status=None)]
    assert statuses.count(429) == 1 and statuses.count(200) == 20
    assert "test (20 examples" in completed.stdout
