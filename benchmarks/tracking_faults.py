"""What a tracking server that goes away mid-run costs a run: the same `distillprompt optimize`
untracked, tracked by a real `mlflow server`, tracked by one that is killed (SIGKILL, its
whole process group) when round 2 starts, by one that is killed then and started again
10 s later, and by one that hangs from then on (SIGSTOP: it takes connections, never answers).

    python benchmarks/tracking_faults.py          # latency 0.3 s, 16 slots, 3 rounds, train 30, test 30
    python benchmarks/tracking_faults.py --async-logging   # with MLFLOW_ENABLE_ASYNC_LOGGING=true

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
import threading
import time
from pathlib import Path

from common import ROOT, free_port, start_endpoint  # this folder is on sys.path when run as a script

sys.path.insert(0, str(ROOT))
from tests.conftest import review_rows, start_mlflow_server, stop_group, venv_env, write_jsonl  # noqa: E402


def run_once(name: str, work: Path, base_url: str, data: Path, extra: list[str], kill: list | None = None,
             back_after: float | None = None, env: dict[str, str] | None = None,
             how: signal.Signals = signal.SIGKILL, tracking_uri: str | None = None) -> tuple[int, float, bool]:
    """``kill`` holds the server (sent ``how`` when round 2 starts: SIGKILL, or SIGSTOP for a
    server that hangs); with ``back_after`` a new one starts on the same store that many
    seconds later (and replaces it in ``kill``). With ``tracking_uri`` the run is launched by
    `mlflow run . -e optimize` tracking there, as a user of the MLproject would."""
    if tracking_uri is None:
        command = [
            sys.executable, "-m", "distillprompt", "optimize", "--dataset", str(data), "--base-url", base_url,
            "--model", "test-model", "--epochs", "3", "--train-size", "30", "--test-size", "30", "--executor", "local",
            "--cache-path", str(work / f"{name}.sqlite"), "--output", str(work / name), *extra,
        ]
    else:
        parameters = {"dataset": data, "base_url": base_url, "model": "test-model", "rounds": 3, "train_size": 30,
                      "test_size": 30, "executor": "local"}
        command = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "optimize", "--env-manager",
                   "local", "--experiment-name", "tracking-faults",
                   *(part for key, value in parameters.items() for part in ("-P", f"{key}={value}"))]
        env = {**(env or {}), "MLFLOW_TRACKING_URI": tracking_uri, "DISTILLPROMPT_OUTPUT": str(work / name),
               "DISTILLPROMPT_CACHE__PATH": str(work / f"{name}.sqlite")}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=venv_env({"PYTHONPATH": str(ROOT), **(env or {})}))
    assert process.stderr is not None
    restart: threading.Thread | None = None
    for line in process.stderr:
        if kill and line.startswith("round 2/") and kill[0].poll() is None and restart is None:
            os.killpg(kill[0].pid, how)
            if how == signal.SIGKILL:
                kill[0].wait()
            if back_after is not None:
                def come_back(server: subprocess.Popen = kill[0]) -> None:
                    time.sleep(back_after)
                    kill[0] = start_mlflow_server(work / "mlflow", int(server.args[server.args.index("--port") + 1]))

                restart = threading.Thread(target=come_back)
                restart.start()
    process.wait()
    if restart is not None:
        restart.join()
    return process.returncode, time.perf_counter() - started, any((work / name).rglob("result.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--async-logging", action="store_true", help="set MLFLOW_ENABLE_ASYNC_LOGGING=true in the runs")
    parser.add_argument("--mlflow-run", action="store_true",
                        help="also launch with `mlflow run` and kill the server at round 2, with MLflow's HTTP "
                        "retries as they are and bounded (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, _TIMEOUT=30)")
    args = parser.parse_args()
    env = {"MLFLOW_ENABLE_ASYNC_LOGGING": "true"} if args.async_logging else {}
    work = Path(tempfile.mkdtemp(prefix="tracking-faults-"))
    data = work / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", review_rows(30, seed=1))
    write_jsonl(data / "test.jsonl", review_rows(30, seed=2))
    endpoint, base_url = start_endpoint(args.latency, args.capacity, [])
    store = work / "mlflow"
    store.mkdir()
    tracking_port = free_port()
    server = [start_mlflow_server(store, tracking_port)]
    tracking = ["--tracking-uri", f"http://127.0.0.1:{tracking_port}"]
    try:
        rows = [
            ("untracked", run_once("untracked", work, base_url, data, [], env=env)),
            ("tracked", run_once("tracked", work, base_url, data, tracking, env=env)),
            ("tracked, server killed at round 2", run_once("killed", work, base_url, data, tracking, kill=server, env=env)),
        ]
        server = [start_mlflow_server(store, tracking_port)]
        rows.append(("tracked, server away 10 s from round 2",
                     run_once("blink", work, base_url, data, tracking, kill=server, back_after=10, env=env)))
        rows.append(("tracked, server hung (SIGSTOP) at round 2",
                     run_once("hung", work, base_url, data, tracking, kill=server, env=env, how=signal.SIGSTOP)))
        os.killpg(server[0].pid, signal.SIGCONT)
        if args.mlflow_run:
            bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
            for label, extra_env in (("MLflow's defaults", {}), ("retries bounded", bounded)):
                stop_group(server[0])
                server = [start_mlflow_server(store, tracking_port)]
                rows.append((f"mlflow run, server killed at round 2, {label}",
                             run_once(f"mlflow-run-{len(rows)}", work, base_url, data, [], kill=server,
                                      env={**env, **extra_env}, tracking_uri=tracking[1])))
    finally:
        stop_group(server[0])
        endpoint.terminate()
    print(f"latency {args.latency} s, {args.capacity} slots, 3 rounds, train 30, test 30, no shared cache"
          + (", MLFLOW_ENABLE_ASYNC_LOGGING=true" if args.async_logging else ""))
    print("| run | exit | wall s | result.json |")
    print("|---|---:|---:|---|")
    for name, (code, wall, written) in rows:
        print(f"| {name} | {code} | {wall:.1f} | {'written' if written else 'missing'} |")


if __name__ == "__main__":
    main()
