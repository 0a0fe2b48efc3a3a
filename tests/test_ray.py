"""Scoring on a real two-node Ray cluster: placement, equality with in-process scoring,
an actor killed mid-scoring, and a Ray Job submitted end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from contextlib import AsyncExitStack

import pytest

from distillprompt import runner
from distillprompt.context import open_context
from distillprompt.executors import LocalExecutor
from distillprompt.settings import load_settings
from ray_jobs.executor import RayExecutor
from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint
from tests.ray_cluster import TwoNodeCluster, optimize_on_actors


@pytest.fixture(scope="module")
def cluster():
    started = TwoNodeCluster.start()
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield started
    finally:
        started.stop()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


def settings_for(endpoint, dataset, tmp_path, **top):
    return load_settings(
        {
            "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01, "concurrency": 8},
            "data": {"dataset": str(dataset), "train_size": 12, "test_size": 10},
            "optimizer": {"epochs": 1},
            "cache": {"path": str(tmp_path / "cache.sqlite")},
            "output": str(tmp_path / "out"),
            **top,
        }
    )


def test_actors_spread_over_both_nodes_and_score_like_in_process(cluster, endpoint, reviews_dir, tmp_path):
    settings = settings_for(endpoint, reviews_dir, tmp_path / "ray", ray_address=cluster.address, ray_actors=4)

    async def on_ray():
        executor = RayExecutor(settings)
        try:
            placement = await executor.placement()
            result, _ = await runner.optimize(settings, executor=executor)
            return placement, result
        finally:
            await executor.aclose()

    placement, on_cluster = asyncio.run(on_ray())
    assert len({actor["node_id"] for actor in placement}) == 2, cluster.actors_report()
    ray_requests = Counter(e.body_hash for e in endpoint.requests())

    endpoint.reset()
    local_settings = settings_for(endpoint, reviews_dir, tmp_path / "local", executor="local")
    in_process, _ = asyncio.run(runner.optimize(local_settings, executor=LocalExecutor()))
    local_requests = Counter(e.body_hash for e in endpoint.requests())

    assert [c.to_dict() for c in on_cluster.history] == [c.to_dict() for c in in_process.history]
    assert on_cluster.final_scores == in_process.final_scores
    assert on_cluster.initial_scores == in_process.initial_scores
    assert ray_requests == local_requests  # the same requests, each sent once


def test_a_race_through_the_actors_stops_and_selects_as_in_process(cluster, reviews_dir, tmp_path):
    from tests.test_racing import target

    with ScriptedEndpoint(responder=target) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path / "ray", ray_address=cluster.address, ray_actors=2)
        settings = settings.with_changes(optimizer={"race_block": 4})
        on_cluster, answered = optimize_on_actors(settings)
        ray_requests = Counter(e.body_hash for e in endpoint.requests())
        endpoint.reset()
        local = settings_for(endpoint, reviews_dir, tmp_path / "local", executor="local").with_changes(
            optimizer={"race_block": 4})
        in_process, _ = asyncio.run(runner.optimize(local, executor=LocalExecutor()))
        local_requests = Counter(e.body_hash for e in endpoint.requests())

    assert answered["actors"] > 0 and answered["driver"] == 0, answered
    assert any(c.eliminated_by is not None for c in on_cluster.history)  # the race stopped some
    assert [c.to_dict() for c in on_cluster.history] == [c.to_dict() for c in in_process.history]
    assert on_cluster.race == in_process.race, (on_cluster.race, in_process.race)
    assert ray_requests == local_requests


def test_the_actors_send_what_the_endpoint_takes_once_the_run_learned_it(cluster, reviews_dir, tmp_path):
    """An endpoint that refuses as OpenAI's reasoning models do: the refusals an actor meets
    teach the driver, and every request after, the actors' included, carries what the
    endpoint takes; only requests already in flight are refused."""
    with ScriptedEndpoint(reasoning=True) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path, ray_address=cluster.address, ray_actors=2)
        result, answered = optimize_on_actors(settings)
        log = endpoint.requests(status=None)
    assert answered["actors"] > 0 and answered["driver"] == 0, answered
    refused = Counter(e.refused for e in log if e.status == 400)
    assert set(refused) == {"max_tokens", "temperature"} and max(refused.values()) <= 8, refused  # --concurrency 8
    ok = [e for e in log if e.status == 200]
    assert len(ok) + sum(refused.values()) == len(log)
    assert all("max_completion_tokens" in e.parameters and "temperature" not in e.parameters for e in ok)
    assert result.records.endpoint["target"]["token_limit"] == "max_completion_tokens"
    assert result.final_scores["train"]["parse_rate"] == 1.0  # room to reason


def wider(settings):
    """32 requests in flight: 2 actors get batches of 8."""
    return settings.with_changes(llm={"concurrency": 32})


def test_requests_reach_the_actors_in_batches(cluster, reviews_dir, tmp_path):
    """One Ray call carries the attempts the limiter admits together (a call per request kept
    the driver as busy as sending the requests itself)."""
    with ScriptedEndpoint(latency=0.02) as slow:
        settings = wider(settings_for(slow, reviews_dir, tmp_path / "ray", ray_address=cluster.address, ray_actors=2))

        async def on_ray():
            executor = RayExecutor(settings)
            try:
                await executor.placement()  # the actors are up: the driver sends no scoring request
                result = (await runner.optimize(settings, executor=executor))[0]
                return result, {"requests": dict(executor.answered), "calls": executor.calls}
            finally:
                await executor.aclose()

        result, record = asyncio.run(on_ray())
        ray_requests = Counter(e.body_hash for e in slow.requests())
        slow.reset()
        local = wider(settings_for(slow, reviews_dir, tmp_path / "local", executor="local"))
        in_process, _ = asyncio.run(runner.optimize(local))
        local_requests = Counter(e.body_hash for e in slow.requests())

    assert record["requests"]["driver"] == 0 and record["requests"]["actors"] > 0, record
    assert record["calls"] * 4 <= record["requests"]["actors"], record
    assert [c.to_dict() for c in result.history] == [c.to_dict() for c in in_process.history]
    assert ray_requests == local_requests


def test_an_actor_killed_mid_scoring_loses_and_repeats_nothing(cluster, reviews_dir, tmp_path):
    prompts = [f"Decide the sentiment of the review, variant {i}." for i in range(6)]
    with ScriptedEndpoint(latency=0.05) as slow:
        settings = settings_for(slow, reviews_dir, tmp_path, ray_address=cluster.address, ray_actors=2)

        async def score_with_a_kill():
            executor = RayExecutor(settings)
            try:
                pids = [actor["pid"] for actor in await executor.placement()]
                async with AsyncExitStack() as stack:
                    context = await open_context(settings, stack)
                    scoring = asyncio.create_task(executor.evaluator(context).score(prompts, context.task.train))
                    while len(slow.requests()) < 20:
                        await asyncio.sleep(0.01)
                    os.kill(pids[0], signal.SIGKILL)
                    answered_at_kill = len(slow.requests())
                    scores = await scoring
                    restarted = [actor["pid"] for actor in await executor.placement()]
                    return scores, context.meter.total(), len(context.cache), pids, restarted, answered_at_kill
            finally:
                await executor.aclose()

        scores, usage, cached, pids, restarted, answered_at_kill = asyncio.run(score_with_a_kill())
        sent_to_endpoint = len(slow.requests())

        async def score_in_process():
            async with AsyncExitStack() as stack:
                context = await open_context(settings.with_changes(executor="local"), stack)
                context.cache = None
                return await LocalExecutor().evaluator(context).score(prompts, context.task.train)

        context_free = asyncio.run(score_in_process())

    pairs = len(prompts) * 12
    assert [s.outputs for s in scores] == [s.outputs for s in context_free]
    assert [s.value for s in scores] == [s.value for s in context_free]
    assert usage.requests == pairs  # each reply counted once, whatever was re-sent
    assert cached == pairs
    assert answered_at_kill < pairs  # the kill came in the middle of scoring
    assert restarted[0] != pids[0] and restarted[1] == pids[1]  # Ray brought the killed actor back
    assert sent_to_endpoint >= pairs  # whatever the killed actor had not answered was sent again


def submit(cluster, endpoint, reviews_dir, train_size: int):
    return run_cli(
        "submit", "--job-address", cluster.job_address,
        "--dataset", str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model",
        "--epochs", "1", "--train-size", str(train_size), "--test-size", "10", "--no-cache",
        env={"RAY_AUTH_MODE": "disabled", "PATH": cluster.env["PATH"]},
        timeout=600,
    )


def test_submit_runs_a_ray_job_to_the_end(cluster, endpoint, reviews_dir, tmp_path):
    completed = submit(cluster, endpoint, reviews_dir, 10)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "submitted Ray job raysubmit_" in completed.stdout
    assert "final prompt" in completed.stdout and "SUCCEEDED" in completed.stdout
    assert Counter(e.stage for e in endpoint.requests(kind="meta"))["rewrite"] == 1


def test_submit_exits_with_the_runs_own_code_for_a_fix(cluster, endpoint, reviews_dir, tmp_path):
    """A job whose run refuses its input exits 2, as the same run would on this machine, not
    the 1 of a failed optimization (3, an incomplete MLflow record, passes the same way)."""
    completed = submit(cluster, endpoint, reviews_dir, 100000)
    assert completed.returncode == 2, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "FAILED (exit code 2)" in completed.stdout
    assert "--train-size" in completed.stdout + completed.stderr  # the run's own line, from the job's log


def test_submit_without_a_jobs_address_names_the_fix(reviews_dir, tmp_path):
    completed = run_cli("submit", "--dataset", str(reviews_dir), "--base-url", "http://127.0.0.1:9/v1")
    assert completed.returncode == 2
    assert "--job-address" in completed.stderr and "Traceback" not in completed.stderr


def test_job_config_carries_no_secret(reviews_dir, tmp_path):
    from ray_jobs.submit import build_job

    settings = load_settings({"llm": {"api_key": "sk-planted-secret", "base_url": "http://proxy:pw-planted@x/v1"},
                              "data": {"dataset": str(reviews_dir)}})
    entrypoint, runtime_env = build_job(settings, tmp_path)
    shipped = (tmp_path / "distillprompt-job.json").read_text()
    for secret in ("sk-planted-secret", "pw-planted"):
        assert secret not in shipped + entrypoint + json.dumps(runtime_env)
    assert json.loads(shipped)["llm"]["base_url"] == "http://***@x/v1"  # the cluster's variable gives it whole
    assert json.loads(shipped)["data"]["dataset"] == "data/" + reviews_dir.name
    assert (tmp_path / "data" / reviews_dir.name / "train.jsonl").is_file()
