"""Shared fixtures: a scripted OpenAI-compatible endpoint on loopback and small datasets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.endpoint import ScriptedEndpoint

ROOT = Path(__file__).resolve().parent.parent

GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "charming", "fun", "beautiful"]
BAD = ["terrible", "awful", "boring", "dull", "tedious", "horrible", "disappointing", "lame"]
THINGS = ["film", "soundtrack", "cast", "story", "ending", "script", "camera work", "pacing", "dialogue", "finale"]


def review_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Short labelled reviews whose sentiment word decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        thing = rng.choice(THINGS)
        rows.append({"text": f"The {thing} was {word} (review {seed}-{i}).", "label": "positive" if positive else "negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reviews_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder dataset: train.jsonl (80 rows) and test.jsonl (40 rows)."""
    folder = tmp_path_factory.mktemp("reviews")
    write_jsonl(folder / "train.jsonl", review_rows(80, seed=1))
    write_jsonl(folder / "test.jsonl", review_rows(40, seed=2))
    return folder


@pytest.fixture()
def endpoint():
    with ScriptedEndpoint() as server:
        yield server


@pytest.fixture()
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the installed console script in a child process, as a user would."""
    # MLFLOW_TRACKING_URI too: mlflow.set_tracking_uri in this process exports it, and a run
    # that should not be tracked must not inherit it from an earlier test
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLPROMPT_", "OPENAI_", "MLFLOW_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "distillprompt", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def venv_env(extra: dict[str, str] | None = None, python: str | Path = sys.executable) -> dict[str, str]:
    """The environment of a child process that must find the `python` and `mlflow` of this
    venv (or of the one ``python`` belongs to)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLPROMPT_", "OPENAI_", "MLFLOW_"))}
    env["PATH"] = f"{Path(python).parent}:{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, timeout: float = 90) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on loopback with a sqlite database and an artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = start_mlflow_server(folder, port)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "db": folder / "mlflow.db", "artifacts": folder / "artifacts"}
    finally:
        stop_group(server)


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on loopback, in a process group of its own (its uvicorn workers
    outlive a killed parent), on a database and artifact folder in ``folder`` that outlive it;
    answering once this returns."""
    with (folder / "server.log").open("a") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")), "server",
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination", str(folder / "artifacts"),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=venv_env(), cwd=folder, start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health")
    except RuntimeError:
        stop_group(server)
        raise
    return server


def stop_group(process: subprocess.Popen) -> None:
    """Stops a child started with start_new_session=True and everything it started."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
