"""The default executor: a local Ray instance that the run starts and stops by itself."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint


def ray_processes() -> set[int]:
    listing = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in listing.stdout.split()}


def test_default_ray_executor_matches_local_and_leaves_nothing_running(endpoint, reviews_dir, tmp_path):
    before = ray_processes()
    results = {}
    # an endpoint that takes its time, as real ones do: the run waits on it, not on the driver
    slow = ScriptedEndpoint(latency=0.2).start()
    for executor in ("ray-now", "ray", "local"):
        options = {"ray-now": ["--ray-start", "now"], "ray": [], "local": ["--executor", "local"]}[executor]
        url = slow.base_url if executor == "ray" else endpoint.base_url
        completed = run_cli(
            "optimize", "--dataset", str(reviews_dir), "--base-url", url, "--model", "test-model",
            "--epochs", "1", "--train-size", "12", "--test-size", "10", "--no-cache",
            "--output", str(tmp_path / executor), *options,
        )
        assert completed.returncode == 0, completed.stderr
        results[executor] = json.loads((tmp_path / executor / "result.json").read_text())
    slow.stop()
    assert results["ray"]["settings"]["executor"] == "ray"
    for key in ("final_prompt", "initial_scores", "final_scores", "history"):
        assert results["ray-now"][key] == results["local"][key]
        assert results["ray"][key] == results["local"][key]
    # --ray-start now: the instance started with the run (the driver answers until its actors
    # are up, which on this short run may be never)
    assert results["ray-now"]["ray"]["started"] is True
    # the default waits for a busy driver: a 12-example run never pays Ray's start-up
    assert results["ray"]["ray"]["started"] is False
    scoring = sum(results["local"]["usage"]["by_stage"][stage]["requests"] for stage in ("train", "test"))
    assert results["ray"]["ray"]["requests"] == {"actors": 0, "driver": scoring}
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
