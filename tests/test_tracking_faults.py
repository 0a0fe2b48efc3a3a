"""A tracking server that goes away mid-run: the run finishes without it, says so in one
line with the command that completes the record, and that command, once the server is back,
completes it without a request to the endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

from tests.conftest import ROOT, free_port, review_rows, run_cli, start_mlflow_server, stop_group, venv_env, write_jsonl
from tests.endpoint import ScriptedEndpoint


def test_a_server_killed_after_round_one_costs_the_run_nothing_and_resume_completes_the_record(tmp_path):
    import mlflow

    data = tmp_path / "reviews"
    data.mkdir()
    write_jsonl(data / "train.jsonl", review_rows(30, seed=21))
    write_jsonl(data / "test.jsonl", review_rows(30, seed=22))
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            command = [
                sys.executable, "-m", "distillprompt", "optimize", "--dataset", str(data),
                "--base-url", endpoint.base_url, "--model", "test-model", "--epochs", "3", "--train-size", "30",
                "--test-size", "30", "--executor", "local", "--tracking-uri", uri, "--experiment", "blink",
                "--prompt-name", "blink", "--cache-path", str(tmp_path / "cache.sqlite"),
                "--output", str(tmp_path / "out"),
            ]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env=venv_env(), cwd=ROOT)
            lines: list[str] = []

            def read_stderr() -> None:
                for line in process.stderr:
                    lines.append(line)
                    if line.startswith("round 2/") and server.poll() is None:  # round 1 is recorded
                        os.killpg(server.pid, signal.SIGKILL)  # the whole group, as an OOM kill would
                        server.wait(30)

            reader = threading.Thread(target=read_stderr, daemon=True)
            reader.start()
            process.wait(timeout=600)  # guards a hang: before, every call took minutes of retries
            reader.join(30)
            stderr = "".join(lines)
            assert server.poll() is not None, "the server was never killed: no 'round 2/' line"
            # the optimization finished: its result is written whole, and the run says what is missing
            assert process.returncode == 3, stderr[-3000:]
            (result_file,) = (tmp_path / "out").rglob("result.json")
            result = json.loads(result_file.read_text())
            assert len(result["rounds"]) == 3 and result["stop_reason"] == "rounds"
            (notice,) = [line for line in stderr.splitlines() if "MLflow tracking was lost after round 1" in line]
            resume = re.search(r"distillprompt optimize --resume (\w+) --tracking-uri (\S+)", notice)
            assert resume and resume.group(2) == uri
            run_id = resume.group(1)
            sent = len(endpoint.requests())

            # the server comes back; the command the notice named completes the record from the cache
            server = start_mlflow_server(store, port)
            completed = run_cli("optimize", "--resume", run_id, "--tracking-uri", uri,
                                "--output", str(tmp_path / "completed"))
            assert completed.returncode == 0, completed.stderr[-3000:]
            assert len(endpoint.requests()) == sent  # not one request to the endpoint
        client = mlflow.MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(run_id, "best_train_score")] == [1, 2, 3]
        assert client.get_run(run_id).info.status == "FINISHED"
        mlflow.set_tracking_uri(uri)
        prompt = mlflow.genai.load_prompt("prompts:/blink@candidate")
        assert result["final_prompt"] in prompt.template
    finally:
        stop_group(server)
