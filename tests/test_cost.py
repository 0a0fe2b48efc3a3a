"""Cost before the run and under a cap: the dry run's estimate (0 completion requests; a full
scoring run within 10% of it, a race under its upper bound), --max-cost, and score against
prompt length for every candidate (candidates.csv, pareto.png, --prefer-shorter,
--max-prompt-tokens)."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import pytest

from distillprompt import runner
from distillprompt.llm import text_tokens
from distillprompt.settings import load_settings
from tests.capable import CapableModel
from tests.conftest import run_cli
from tests.endpoint import HiddenAccuracy, ScriptedEndpoint

PRICES = {"price_input": 0.15, "price_output": 0.6}  # USD per 1M tokens


def fresh_model(reviews_dir: Path) -> HiddenAccuracy:
    """A target whose accuracy depends on the instruction, and an optimizer that writes a new
    instruction of about the initial prompt's length every time."""
    return HiddenAccuracy.from_arguments("0.7:0.95", 0.0, str(reviews_dir), [], True)


def settings_for(endpoint: ScriptedEndpoint, reviews_dir: Path, tmp_path: Path, **optimizer):
    return load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model", **PRICES},
        "data": {"dataset": str(reviews_dir), "train_size": 40, "test_size": 30},
        "optimizer": {"rounds": 2, **optimizer},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })


def test_the_dry_run_prints_the_estimate_and_sends_no_completion_request(reviews_dir, tmp_path):
    with ScriptedEndpoint() as endpoint:
        done = run_cli(
            "optimize", "--dataset", str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model",
            "--epochs", "2", "--train-size", "40", "--test-size", "30", "--executor", "local",
            "--cache-path", str(tmp_path / "cache.sqlite"), "--output", str(tmp_path / "out"),
            "--price-input", "0.15", "--price-output", "0.6", "--dry-run",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert endpoint.requests() == []  # not one completion request
    text = done.stdout
    for part in ("meta requests", "scoring requests", "at most (every candidate scored in full)", "of which test 60",
                 "total tokens", "cost               $", "response cache     holds none", "no completion request was sent"):
        assert part in text, text
    assert not (tmp_path / "out").exists()  # nothing written, nothing paid


def test_a_full_scoring_run_spends_within_ten_percent_of_its_estimate_and_a_race_stays_under_the_bound(
    reviews_dir, tmp_path
):
    with ScriptedEndpoint(responder=fresh_model(reviews_dir)) as endpoint:
        full, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path / "full", scoring="full")))
        raced, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path / "race")))
        sent = len(endpoint.requests())
        # the same command again, dry: the cache holds every call the run made, and their
        # tokens as the endpoint counted them, in and out
        again = asyncio.run(runner.dry_run(settings_for(endpoint, reviews_dir, tmp_path / "full", scoring="full")))
        assert len(endpoint.requests()) == sent
    assert again.cached == full.usage.calls
    assert again.tokens == (full.usage.input_tokens, full.usage.output_tokens)
    assert again.cached_cost == pytest.approx(full.usage.cost)
    estimate, usage = full.records.estimate, full.usage
    assert usage.requests == pytest.approx(estimate["estimated_requests"], rel=0.10)
    spent = usage.input_tokens + usage.output_tokens
    assert spent == pytest.approx(estimate["estimated_input_tokens"] + estimate["estimated_output_tokens"], rel=0.10)
    assert usage.cost == pytest.approx(estimate["estimated_cost_usd"], rel=0.10)
    bound = raced.records.estimate
    assert bound["scoring"] == "race" and raced.race["stopped"] > 0
    assert raced.usage.requests <= bound["estimated_requests_max"]
    assert raced.usage.input_tokens + raced.usage.output_tokens <= (
        bound["estimated_input_tokens_max"] + bound["estimated_output_tokens_max"]
    )
    assert raced.usage.cost <= bound["estimated_cost_usd_max"]


def test_a_capable_models_run_sends_the_requests_the_estimate_counted(reviews_dir, tmp_path):
    """Long, structured candidates cost more tokens than the estimate's initial-length ones
    (the dry run says so), but the requests are the run's structure: within 10%."""
    with ScriptedEndpoint(responder=CapableModel()) as endpoint:
        result, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path, scoring="full")))
    assert result.usage.requests == pytest.approx(result.records.estimate["estimated_requests"], rel=0.10)


def test_max_cost_stops_at_its_budget_keeps_the_best_prompt_and_a_rerun_stops_at_the_same_place(reviews_dir, tmp_path):
    with ScriptedEndpoint(responder=fresh_model(reviews_dir), latency=0.01) as endpoint:
        planned = asyncio.run(runner.dry_run(settings_for(endpoint, reviews_dir, tmp_path, scoring="full")))
        budget = planned.cost / 2
        # a bound on the requests in flight that the overrun is held to
        capped = settings_for(endpoint, reviews_dir, tmp_path, scoring="full", max_cost=budget).with_changes(
            llm={"concurrency": 4})
        result, folder = asyncio.run(runner.optimize(capped))
        rerun, _ = asyncio.run(runner.optimize(capped))
    assert result.stop_reason == "max_cost"
    # over the budget by at most the requests in flight when it ran out
    per_request = max(u.cost / u.requests for u in result.usage_by_stage.values() if u.requests)
    assert budget * 0.5 < result.usage.cost <= budget + capped.llm.max_in_flight * per_request
    # the best prompt so far: the round the budget stopped is kept with the candidates it had
    # scored (not rolled back), and the final prompt is the best of every candidate scored on
    # the whole train sample
    stopped = result.rounds[-1]
    assert stopped.stop_reason == "max_cost", "the round the budget stopped was thrown away"
    assert any(c.round == stopped.round and c.selectable for c in result.history)
    assert result.final.score == max(c.score for c in result.history if c.selectable)
    assert result.final_scores["test"]["score"] is not None  # the best prompt so far, tested
    assert json.loads((folder / "result.json").read_text())["stop_reason"] == "max_cost"
    # the cache's replies count against the budget: the rerun stops where the first run did
    assert rerun.stop_reason == "max_cost" and rerun.final_prompt == result.final_prompt
    assert len(rerun.history) == len(result.history)
    assert rerun.usage.cache_hits > 0 and rerun.usage.cost < result.usage.cost


def test_a_budget_that_cannot_pay_for_the_initial_prompts_scores_is_refused_before_any_request(reviews_dir, tmp_path):
    with ScriptedEndpoint() as endpoint:
        planned = asyncio.run(runner.dry_run(settings_for(endpoint, reviews_dir, tmp_path)))
        # more than the test scoring, less than that and the initial prompt's train scoring
        budget = planned.test_cost + planned.initial_cost / 2
        done = run_cli("optimize", "--dataset", str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model",
                       "--train-size", "40", "--test-size", "30", "--executor", "local", "--price-input", "0.15",
                       "--price-output", "0.6", "--max-cost", f"{budget:.8f}", "--cache-path", str(tmp_path / "c.sqlite"))
        assert endpoint.requests() == []
    assert done.returncode == 2, done.stderr[-2000:]
    # the estimate's line, then one line that names the fix
    (line,) = [line for line in done.stderr.strip().splitlines() if not line.startswith("estimate: ")]
    assert "does not cover scoring the initial prompt and the test sample" in line and "raise --max-cost" in line


def test_max_cost_without_prices_is_refused_in_one_line(reviews_dir, tmp_path):
    done = run_cli("optimize", "--dataset", str(reviews_dir), "--base-url", "http://127.0.0.1:9/v1",
                   "--model", "m", "--max-cost", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "distillprompt: error: --max-cost needs prices: give --price-input and --price-output (USD per 1M tokens)"
    ]
    # compare too: without prices its children could spend without limit
    done = run_cli("compare", "--methods", "initial", "--dataset", str(reviews_dir), "--base-url",
                   "http://127.0.0.1:9/v1", "--model", "m", "--max-cost", "2", "--dry-run")
    assert done.returncode == 2 and "--max-cost needs prices" in done.stderr, done.stderr[-2000:]


def test_every_candidate_gets_its_length_and_cost_and_the_front_is_drawn(reviews_dir, tmp_path):
    with ScriptedEndpoint(responder=CapableModel()) as endpoint:
        result, folder = asyncio.run(runner.optimize(
            settings_for(endpoint, reviews_dir, tmp_path, scoring="full", max_prompt_tokens=150)
        ))
    rows = list(csv.DictReader((folder / "candidates.csv").open(encoding="utf-8")))
    scored = [c for c in result.history if c.duplicate_of is None and c.score is not None]
    assert [int(r["id"]) for r in rows] == [c.id for c in scored]
    for row, candidate in zip(rows, scored):
        assert int(row["prompt_tokens"]) == text_tokens(candidate.prompt) <= 150 or candidate.stage == "initial"
        assert float(row["cost_per_example_usd"]) > 0
    # the front: no candidate on it is beaten on both score and length by another
    front = [r for r in rows if r["on_front"] == "True" and r["stopped_by_race"] == "False"]
    assert front
    for row in front:
        assert not any(float(o["train_score"]) >= float(row["train_score"]) and int(o["prompt_tokens"]) < int(row["prompt_tokens"])
                       for o in rows if o["stopped_by_race"] == "False")
    assert [r["id"] for r in rows if r["final"] == "True"] == [str(result.final.id)]
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the capable model's longer prompts were refused, under a reason of their own
    assert sum(reasons.get("too_many_tokens", 0) for reasons in result.rejections.values()) > 0
    assert result.records.pareto["summary"]


def test_prefer_shorter_picks_the_shortest_prompt_within_one_example_of_the_best(reviews_dir, tmp_path):
    with ScriptedEndpoint(responder=CapableModel()) as endpoint:
        result, _ = asyncio.run(runner.optimize(
            settings_for(endpoint, reviews_dir, tmp_path, scoring="full", rounds=1, prefer_shorter=True)
        ))
    pool = [c for c in result.history if c.selectable and c.duplicate_of is None]
    best = max(c.score for c in pool)
    near = [c for c in pool if c.score >= best - 1 / 40 - 1e-9]
    assert text_tokens(result.final.prompt) == min(text_tokens(c.prompt) for c in near)
    assert result.final.score >= best - 1 / 40 - 1e-9


def test_compare_dry_run_sums_every_childs_estimate_and_sends_nothing(reviews_dir, tmp_path):
    with ScriptedEndpoint() as endpoint:
        done = run_cli(
            "compare", "--methods", "distillprompt,grips,initial", "--seeds", "2", "--dataset", str(reviews_dir),
            "--base-url", endpoint.base_url, "--model", "test-model", "--epochs", "2", "--train-size", "20",
            "--test-size", "20", "--executor", "local", "--cache-path", str(tmp_path / "cache.sqlite"),
            "--price-input", "0.15", "--price-output", "0.6", "--dry-run",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert endpoint.requests() == []
    (header,) = [line for line in done.stdout.splitlines() if line.startswith("| method")]
    column = {name.strip(): i for i, name in enumerate(header.split("|"))}
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    children = [row for row in rows if not row.startswith("| **all**")]
    assert len(children) == 6  # 3 methods, 2 seeds

    def figures(name: str, row: str) -> int:
        return int(row.split("|")[column[name]].strip(" *").replace(",", ""))

    requests = [figures("requests", row) for row in children]
    assert figures("requests", rows[-1]) == sum(requests) and all(r > 0 for r in requests)
    for row in children:  # meta and scoring requests make the total, and each carries tokens
        assert figures("meta requests", row) + figures("scoring requests", row) == figures("requests", row)
        assert figures("tokens in", row) > 0 and figures("tokens out", row) > 0
    initial = [r for row, r in zip(children, requests) if row.startswith("| initial")]
    assert initial == [40, 40]  # the initial prompt on train and test, nothing else
    assert all(figures("meta requests", row) == 0 for row in children if row.startswith("| initial"))
