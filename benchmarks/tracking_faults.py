"""What a tracking server that goes away mid-run costs a run: the same `distillprompt optimize`
untracked, tracked by a real `mlflow server`, and tracked by one that is killed (SIGKILL, its
whole process group) when round 2 starts.

    python benchmarks/tracking_faults.py          # latency 0.3 s, 16 slots, 3 rounds, train 30, test 30

Each run has a response cache of its own (every request reaches the endpoint); the table gives
the exit status, the wall time of the whole process and whether result.json was written.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, start_endpoint  # this folder is on sys.path when run as a script

sys.path.insert(0, str(ROOT))
from tests.conftest import review_rows, start_mlflow_server, stop_group, venv_env, write_jsonl  # noqa: E402


def run_once(name: str, work: Path, base_url: str, data: Path, extra: list[str],
             kill: subprocess.Popen | None = None) -> tuple[int, float, bool]:
    command = [
        sys.executable, "-m", "distillprompt", "optimize", "--dataset", str(data), "--base-url", base_url,
        "--model", "test-model", "--epochs", "3", "--train-size", "30", "--test-size", "30", "--executor", "local",
        "--cache-path", str(work / f"{name}.sqlite"), "--output", str(work / name), *extra,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=venv_env({"PYTHONPATH": str(ROOT)}))
    assert process.stderr is not None
    for line in process.stderr:
        if kill is not None and line.startswith("round 2/") and kill.poll() is None:
            os.killpg(kill.pid, signal.SIGKILL)
            kill.wait()
    process.wait()
    return process.returncode, time.perf_counter() - started, any((work / name).rglob("result.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--capacity", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracking-faults-"))
    data = work / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", review_rows(30, seed=1))
    write_jsonl(data / "test.jsonl", review_rows(30, seed=2))
    endpoint, base_url = start_endpoint(args.latency, args.capacity, [])
    store = work / "mlflow"
    store.mkdir()
    tracking_port = free_port()
    server = start_mlflow_server(store, tracking_port)
    tracking = ["--tracking-uri", f"http://127.0.0.1:{tracking_port}"]
    try:
        rows = [
            ("untracked", run_once("untracked", work, base_url, data, [])),
            ("tracked", run_once("tracked", work, base_url, data, tracking)),
            ("tracked, server killed at round 2", run_once("killed", work, base_url, data, tracking, kill=server)),
        ]
    finally:
        stop_group(server)
        endpoint.terminate()
    print(f"latency {args.latency} s, {args.capacity} slots, 3 rounds, train 30, test 30, no shared cache")
    print("| run | exit | wall s | result.json |")
    print("|---|---:|---:|---|")
    for name, (code, wall, written) in rows:
        print(f"| {name} | {code} | {wall:.1f} | {'written' if written else 'missing'} |")


if __name__ == "__main__":
    main()
