"""The default executor: a local Ray instance that the run starts and stops by itself; its
actors score as the process does."""

from __future__ import annotations

import asyncio
import json
import subprocess

from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint


def ray_processes() -> set[int]:
    listing = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in listing.stdout.split()}


def test_a_local_instance_s_actors_score_every_request_as_the_process_does_and_stop_with_it(reviews_dir, tmp_path):
    """A local Ray instance (no address) started at once, its actors up before the run: they
    send every scoring request, the run ends as an in-process run does, and the instance is
    gone once the executor closes."""
    from distillprompt import runner
    from distillprompt.executors import LocalExecutor
    from distillprompt.settings import load_settings
    from tests.ray_cluster import optimize_on_actors

    before = ray_processes()

    def settings_for(url: str, folder: str, **top):
        return load_settings({"llm": {"base_url": url, "model": "test-model", "concurrency": 8},
                              "data": {"dataset": str(reviews_dir), "train_size": 12, "test_size": 10},
                              "optimizer": {"epochs": 1}, "cache": {"enabled": False},
                              "output": str(tmp_path / folder), **top})

    with ScriptedEndpoint() as endpoint:
        on_actors, answered = optimize_on_actors(settings_for(endpoint.base_url, "ray", ray_start="now"))
        local, _ = asyncio.run(runner.optimize(settings_for(endpoint.base_url, "local", executor="local"),
                                               executor=LocalExecutor()))
    scoring = sum(usage.requests for stage, usage in local.usage_by_stage.items() if stage in ("train", "test"))
    assert answered == {"actors": scoring, "driver": 0}  # Ray answered, and only Ray
    assert [c.to_dict() for c in on_actors.history] == [c.to_dict() for c in local.history]
    assert (on_actors.initial_scores, on_actors.final_scores) == (local.initial_scores, local.final_scores)
    assert ray_processes() <= before  # the local instance stopped with the executor


def test_the_command_line_starts_a_local_instance_only_when_asked_or_busy_and_leaves_nothing_running(
    endpoint, reviews_dir, tmp_path
):
    before = ray_processes()
    results = {}
    # an endpoint that takes its time, as real ones do: the run waits on it, not on the driver
    with ScriptedEndpoint(latency=0.2) as slow:
        for executor, url, options in (("ray-now", endpoint.base_url, ["--ray-start", "now"]),
                                       ("ray", slow.base_url, [])):
            completed = run_cli(
                "optimize", "--dataset", str(reviews_dir), "--base-url", url, "--model", "test-model",
                "--epochs", "1", "--train-size", "12", "--test-size", "10", "--no-cache",
                "--output", str(tmp_path / executor), *options,
            )
            assert completed.returncode == 0, completed.stderr
            results[executor] = json.loads((tmp_path / executor / "result.json").read_text())
    assert results["ray"]["settings"]["executor"] == "ray"
    # --ray-start now: the instance started with the run (the driver answers until its actors
    # are up, which on this short run may be never)
    assert results["ray-now"]["ray"]["started"] is True
    # the default waits for a busy driver: a 12-example run never pays Ray's start-up
    record = results["ray"]["ray"]
    scoring = sum(results["ray"]["usage"]["by_stage"][stage]["requests"] for stage in ("train", "test"))
    assert record["started"] is False and record["requests"] == {"actors": 0, "driver": scoring}
    assert ray_processes() <= before  # the local instance is gone with the run


def test_a_local_instance_waits_for_a_driver_busy_five_seconds_in_a_row(monkeypatch):
    """The rule that starts a local Ray instance (--ray-start auto), on a clock the test turns:
    a busy second now and then does not start it; five busy seconds in a row do."""
    import ray_jobs.executor as executor

    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(executor.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(executor.time, "thread_time", lambda: clock["cpu"])
    load = executor.DriverLoad()

    def second(share: float) -> bool:
        clock["wall"] += 1.0
        clock["cpu"] += share
        return load.busy()

    assert load.busy() is False  # the first reading opens the window
    # an endpoint-bound run: the driver uses 40% of a core, with a busy second among them
    assert not any(second(share) for share in (0.4, 0.9, 0.4, 0.9, 0.9, 0.9, 0.9, 0.3))
    # a driver-bound run: the fifth busy second in a row starts Ray
    assert [second(0.95) for _ in range(5)] == [False, False, False, False, True]
