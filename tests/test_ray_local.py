"""The default executor: a local Ray instance that the run starts and stops by itself."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import run_cli


def ray_processes() -> set[int]:
    listing = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(pid) for pid in listing.stdout.split()}


def test_default_ray_executor_matches_local_and_leaves_nothing_running(endpoint, reviews_dir, tmp_path):
    before = ray_processes()
    results = {}
    for executor in ("ray", "local"):
        completed = run_cli(
            "optimize", "--dataset", str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model",
            "--epochs", "1", "--train-size", "12", "--test-size", "10", "--no-cache",
            "--output", str(tmp_path / executor), *(["--executor", "local"] if executor == "local" else []),
        )
        assert completed.returncode == 0, completed.stderr
        results[executor] = json.loads((tmp_path / executor / "result.json").read_text())
    assert results["ray"]["settings"]["executor"] == "ray"
    for key in ("final_prompt", "initial_scores", "final_scores", "history"):
        assert results["ray"][key] == results["local"][key]
    assert ray_processes() <= before  # the local instance is gone with the run
