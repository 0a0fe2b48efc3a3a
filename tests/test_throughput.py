"""How fast a run may send: --concurrency auto against an endpoint that throttles, requests per
minute, and Retry-After holding every new request (scripted endpoint over HTTP, CLI runs)."""

from __future__ import annotations

import json
import time

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


def test_requests_per_minute_are_never_exceeded(reviews_dir, tmp_path):
    """--rpm 300 (5 a second) against an endpoint that answers at once: 30 test requests take
    about 5 seconds, and no second holds more than a second's worth plus the first burst."""
    with ScriptedEndpoint() as fast:
        completed = run_cli(
            "evaluate", "--prompt", "Classify the sentiment.", "--dataset", str(reviews_dir), "--base-url",
            fast.base_url, "--model", "test-model", "--executor", "local", "--test-size", "30", "--no-cache",
            "--concurrency", "16", "--rpm", "300",
        )
        assert completed.returncode == 0, completed.stderr
        times = sorted(entry.time for entry in fast.requests(kind="scoring"))
    assert len(times) == 30
    assert times[-1] - times[0] >= 4.0  # (30 - 5 allowed at once) / 5 a second = 5 s, less timing slack
    for start in times:
        in_a_second = sum(1 for t in times if start <= t < start + 1.0)
        assert in_a_second <= 11, in_a_second  # 5 a second + a full bucket of 5, + 1 at the edge


def test_retry_after_holds_every_new_request(reviews_dir, tmp_path):
    """The first reply is 429 with Retry-After: 2. The requests already out finish; no new one
    starts until the 2 seconds are over."""
    with ScriptedEndpoint(latency=0.05, script=["429:2"]) as endpoint:
        completed = run_cli(
            "evaluate", "--prompt", "Classify the sentiment.", "--dataset", str(reviews_dir), "--base-url",
            endpoint.base_url, "--model", "test-model", "--executor", "local", "--test-size", "20", "--no-cache",
            "--concurrency", "4",
        )
        assert completed.returncode == 0, completed.stderr
        log = endpoint.requests(status=None)
    refused = [entry.time for entry in log if entry.status == 429]
    assert len(refused) == 1
    later = [entry.time for entry in log if entry.status == 200 and entry.time > refused[0]]
    # the 3 others of the first 4 were in flight when the 429 came; everything after waited 2 s
    early = [t for t in later if t < refused[0] + 1.9]
    assert len(early) <= 3, len(early)
    assert len([entry for entry in log if entry.status == 200]) == 20


def test_rate_budget_spaces_requests_and_tokens():
    budget = RateBudget(rpm=120, tpm=600)  # 2 requests and 10 tokens a second; buckets of that size
    assert budget.delay(5) == 0.0
    budget.take(5)
    assert budget.delay(5) == 0.0  # 1 request and 5 tokens left
    budget.take(5)
    # both buckets are empty: a request of 5 tokens waits for 0.5 s of either refill
    assert budget.delay(5) == pytest.approx(0.5, abs=0.05)
    # a request larger than the token bucket waits for a full bucket (1 s), then may take it below 0
    assert budget.delay(50) == pytest.approx(1.0, abs=0.05)
    time.sleep(0.6)
    assert budget.delay(5) == pytest.approx(0.0, abs=0.1)
