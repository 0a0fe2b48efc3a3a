"""A tracking server that goes away mid-run: the run finishes without waiting for it. A server
that comes back in time gets the whole record; one that does not leaves a one-line notice with
the command that completes the record, and that command, once the server is back, completes it
without a request to the endpoint. A registry that refuses is handled the same way."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ROOT, free_port, review_rows, run_cli, start_mlflow_server, stop_group, venv_env, write_jsonl
from tests.endpoint import ScriptedEndpoint

NOTICE = re.compile(r"distillprompt optimize --resume (\w+) --tracking-uri (\S+)")


def reviews(tmp_path: Path) -> Path:
    data = tmp_path / "reviews"
    data.mkdir()
    write_jsonl(data / "train.jsonl", review_rows(30, seed=21))
    write_jsonl(data / "test.jsonl", review_rows(30, seed=22))
    return data


def a_store(tmp_path: Path) -> tuple[Path, Path, int, str]:
    """The reviews, a folder for a server's database and artifacts, its port and its URI."""
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    return reviews(tmp_path), store, port, f"http://127.0.0.1:{port}"


def optimize_command(tmp_path: Path, data: Path, endpoint: ScriptedEndpoint, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "distillprompt", "optimize", "--dataset", str(data),
        "--base-url", endpoint.base_url, "--model", "test-model", "--epochs", "3", "--train-size", "30",
        "--test-size", "30", "--executor", "local", "--tracking-uri", uri, "--experiment", "blink",
        "--prompt-name", "blink", "--cache-path", str(tmp_path / "cache.sqlite"), "--output", str(tmp_path / "out"),
        *extra,
    ]


def compare_command(tmp_path: Path, data: Path, endpoint: ScriptedEndpoint, uri: str, experiment: str,
                    wait: float) -> list[str]:
    """`compare` of distillprompt (2 rounds) and the initial prompt, tracked at ``uri``."""
    return [
        sys.executable, "-m", "distillprompt", "compare", "--methods", "distillprompt,initial",
        "--seeds", "1", "--dataset", str(data), "--base-url", endpoint.base_url, "--model", "test-model",
        "--epochs", "2", "--train-size", "20", "--test-size", "30", "--executor", "local",
        "--tracking-uri", uri, "--experiment", experiment, "--tracking-wait", str(wait),
        "--cache-path", str(tmp_path / "cache.sqlite"), "--output", str(tmp_path / "out"),
    ]


def run_with(command: list[str], on_line, timeout: float = 600) -> tuple[int, str]:
    """Runs the command; ``on_line`` sees each line of its stderr as it comes."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=venv_env(), cwd=ROOT)
    lines: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)
            on_line(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    process.wait(timeout=timeout)  # guards a hang: before, every call took minutes of retries
    reader.join(30)
    return process.returncode, "".join(lines)


def whole_record(uri: str, run_id: str, final_prompt: str) -> None:
    """The MLflow run holds every round and the final artifacts, and the prompt is registered."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "best_train_score")] == [1, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "final_test_score" in run.data.metrics
    assert len(client.get_metric_history(run_id, "final_test_score")) == 1  # logged once, resumed or not
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"result.json", "prompts", "checkpoints"} <= artifacts, artifacts
    mlflow.set_tracking_uri(uri)
    prompt = mlflow.genai.load_prompt("prompts:/blink@candidate")
    assert final_prompt in prompt.template
    # registered once: a registration made again finds the version the run made
    assert len(client.search_prompt_versions("blink")) == 1
    assert len(client.search_model_versions(f"run_id='{run_id}'")) == 1


def test_a_server_killed_after_round_one_costs_the_run_nothing_and_resume_completes_the_record(tmp_path):
    data, store, port, uri = a_store(tmp_path)
    server = start_mlflow_server(store, port)
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            kill_at_round_two = kill_at("round 2/", server)
            status, stderr = run_with(optimize_command(tmp_path, data, endpoint, uri, "--tracking-wait", "5"),
                                      kill_at_round_two)
            assert server.poll() is not None, "the server was never killed: no 'round 2/' line"
            # the optimization finished: its result is written whole, and the run says what is missing
            assert status == 3, stderr[-3000:]
            (result_file,) = (tmp_path / "out").rglob("result.json")
            result = json.loads(result_file.read_text())
            assert len(result["rounds"]) == 3 and result["stop_reason"] == "rounds"
            (notice,) = [line for line in stderr.splitlines() if "MLflow tracking was lost at" in line]
            resume = NOTICE.search(notice)
            assert resume and resume.group(2) == uri
            run_id = resume.group(1)
            sent = len(endpoint.requests())

            # the server comes back; the command the notice named completes the record from the cache
            server = start_mlflow_server(store, port)
            completed = run_cli("optimize", "--resume", run_id, "--tracking-uri", uri,
                                "--output", str(tmp_path / "completed"))
            assert completed.returncode == 0, completed.stderr[-3000:]
            assert len(endpoint.requests()) == sent  # not one request to the endpoint
            whole_record(uri, run_id, result["final_prompt"])

            # run twice (was the first one done?), the command leaves the record as it was
            again = run_cli("optimize", "--resume", run_id, "--tracking-uri", uri,
                            "--output", str(tmp_path / "again"))
            assert again.returncode == 0, again.stderr[-3000:]
            assert len(endpoint.requests()) == sent
        whole_record(uri, run_id, result["final_prompt"])
    finally:
        stop_group(server)


def test_a_server_that_drops_for_ten_seconds_and_comes_back_gets_the_whole_record(tmp_path):
    data, store, port, uri = a_store(tmp_path)
    servers = [start_mlflow_server(store, port)]
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            blink = away_for_ten_seconds("round 2/", servers, store, port)
            # the default wait (20 s from the outage) holds the server's 10 s away and its start;
            # a loaded machine may take longer to start it, hence 90 s here
            status, stderr = run_with(optimize_command(tmp_path, data, endpoint, uri, "--tracking-wait", "90"), blink)
        assert len(servers) == 2, "the server was never killed: no 'round 2/' line"
        assert status == 0, stderr[-3000:]
        assert "MLflow tracking is back" in stderr
        assert "MLflow tracking was lost" not in stderr
        (result_file,) = (tmp_path / "out").rglob("result.json")
        whole_record(uri, run_id_of(uri), json.loads(result_file.read_text())["final_prompt"])
    finally:
        for server in servers:
            stop_group(server)


def kill_at(prefix: str, server: subprocess.Popen):
    """A line handler that kills the server (its whole group, as an OOM kill would) at the
    first line starting with ``prefix``."""

    def kill(line: str) -> None:
        if line.startswith(prefix) and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)

    return kill


def away_for_ten_seconds(prefix: str, servers: list[subprocess.Popen], store: Path, port: int):
    """A line handler that kills the server (its whole group) at the first line starting with
    ``prefix`` and starts it again on the same store 10 s later, appended to ``servers``."""

    def blink(line: str) -> None:
        if line.startswith(prefix) and len(servers) == 1 and servers[0].poll() is None:
            os.killpg(servers[0].pid, signal.SIGKILL)
            servers[0].wait(30)

            def come_back() -> None:
                time.sleep(10)
                servers.append(start_mlflow_server(store, port))

            threading.Thread(target=come_back, daemon=True).start()

    return blink


def run_id_of(uri: str) -> str:
    """The one run of the experiment."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("blink").experiment_id])
    return run.info.run_id


class RegistryGateway(http.server.ThreadingHTTPServer):
    """A proxy in front of the tracking server whose registry routes answer 503 while
    ``refusing`` is set (a gateway or a permission layer in trouble), or with ``status`` 400 as
    MLflow answers a request it will never accept; everything else passes."""

    daemon_threads = True

    def __init__(self, upstream_port: int, status: int = 503) -> None:
        self.upstream_port = upstream_port
        self.status = status
        self.refusing = True
        self.refused = 0
        super().__init__(("127.0.0.1", 0), GatewayHandler)


class GatewayHandler(http.server.BaseHTTPRequestHandler):
    server: RegistryGateway
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.refusing and ("registered-models" in self.path or "model-versions" in self.path):
            self.server.refused += 1
            body = b"" if self.server.status >= 500 else json.dumps(
                {"error_code": "INVALID_PARAMETER_VALUE", "message": "the registry does not take this name"}).encode()
            self.send_response(self.server.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        content = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay


def test_a_registry_that_refuses_keeps_the_result_and_resume_registers_it(tmp_path):
    data = reviews(tmp_path)
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    server = start_mlflow_server(store, port)
    gateway = RegistryGateway(port)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{gateway.server_address[1]}"
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            status, stderr = run_with(optimize_command(tmp_path, data, endpoint, uri), lambda line: None)
            assert status == 3, stderr[-3000:]
            assert gateway.refused > 0
            (result_file,) = (tmp_path / "out").rglob("result.json")
            result = json.loads(result_file.read_text())
            assert len(result["rounds"]) == 3
            (notice,) = [line for line in stderr.splitlines() if "MLflow tracking was lost at registration" in line]
            assert "3 round(s) recorded" in notice
            run_id = NOTICE.search(notice).group(1)

        # the endpoint is gone now: the completion needs none of it, the cache answers
        gateway.refusing = False  # the registry is fixed; the notice's command registers the prompt
        completed = run_cli("optimize", "--resume", run_id, "--tracking-uri", uri, "--output", str(tmp_path / "completed"))
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert "--resume goes on from the response cache" in completed.stderr
        whole_record(uri, run_id, result["final_prompt"])
    finally:
        gateway.shutdown()
        stop_group(server)


def test_an_error_that_is_no_outage_is_reported_once_and_the_rest_of_the_record_goes_out(tmp_path):
    """A registry that answers 400 (a request it will never take) is no server away: the
    registration is reported with its traceback and left out at once, the calls after it
    (the run's description) are made, and the exit says the record is incomplete."""
    import mlflow

    data = reviews(tmp_path)
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    server = start_mlflow_server(store, port)
    gateway = RegistryGateway(port, status=400)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{gateway.server_address[1]}"
    try:
        with ScriptedEndpoint() as endpoint:
            status, stderr = run_with(optimize_command(tmp_path, data, endpoint, uri, "--epochs", "1"), lambda line: None)
        assert status == 3, stderr[-3000:]
        refused = gateway.refused
        assert refused >= 1 and "MLflow tracking failed in registration" in stderr
        assert stderr.count("Traceback") == 1  # reported once, with its traceback
        assert "is incomplete" in stderr and "left out: registration" in stderr
        assert "waits until the server answers again" not in stderr and "tracking was lost" not in stderr
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("blink").experiment_id])
        assert run.info.status == "FINISHED" and "final_test_score" in run.data.metrics
        assert run.data.tags.get("mlflow.note.content")  # the description, queued after the registration
    finally:
        gateway.shutdown()
        stop_group(server)


def test_a_compare_whose_server_drops_finishes_every_child_and_completes_the_parents_table(tmp_path):
    """The server goes away as the second method starts and comes back 10 s later: that child
    runs locally meanwhile, and the parent's table reaches the server once it is back, once."""
    import mlflow

    data, store, port, uri = a_store(tmp_path)
    servers = [start_mlflow_server(store, port)]
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            blink = away_for_ten_seconds("== initial", servers, store, port)
            status, stderr = run_with(compare_command(tmp_path, data, endpoint, uri, "blink-compare", 90), blink)
        assert len(servers) == 2, "the server was never killed: no '== initial' line"
        assert status == 0, stderr[-3000:]
        assert "MLflow tracking is back" in stderr
        assert (tmp_path / "out" / "comparison.md").exists()
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("blink-compare").experiment_id
        (parent,) = client.search_runs([experiment], "tags.`distillprompt.method` = 'compare'")
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(r.data.tags["distillprompt.method"] for r in children) == ["distillprompt", "initial"]
        assert all("final_test_score" in r.data.metrics for r in children)
        assert {"distillprompt_test_score_mean", "initial_test_score_mean"} <= set(parent.data.metrics)
        table = Path(client.download_artifacts(parent.info.run_id, "comparison/table.json", str(tmp_path)))
        assert len(json.loads(table.read_text())["data"]) == 2  # one row per method, not a table appended twice
    finally:
        for server in servers:
            stop_group(server)


def test_a_server_that_hangs_mid_run_holds_the_run_no_longer_than_the_tracking_wait(tmp_path):
    """The server's processes are stopped (SIGSTOP) when round 2 starts: it still takes
    connections but never answers, so each MLflow call would wait out MLflow's timeout and
    retries (3 attempts of 30 s). The run ends once the call has hung for --tracking-wait
    seconds and /health does not answer either, with the notice and exit 3."""
    data, store, port, uri = a_store(tmp_path)
    server = start_mlflow_server(store, port)
    stopped = []
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            def hang_at_round_two(line: str) -> None:
                if line.startswith("round 2/") and not stopped:
                    os.killpg(server.pid, signal.SIGSTOP)
                    stopped.append(True)

            # the guard is below what one hung call would hold the run (about 92 s), so a run
            # that waits it out fails here instead of passing slowly
            status, stderr = run_with(optimize_command(tmp_path, data, endpoint, uri, "--tracking-wait", "5"),
                                      hang_at_round_two, timeout=85)
        assert stopped, "the server was never stopped: no 'round 2/' line"
        assert status == 3, stderr[-3000:]
        (result_file,) = (tmp_path / "out").rglob("result.json")
        assert len(json.loads(result_file.read_text())["rounds"]) == 3
        (notice,) = [line for line in stderr.splitlines() if "MLflow tracking was lost at" in line]
        assert "did not answer for 5 s (--tracking-wait)" in notice and NOTICE.search(notice)
    finally:
        if stopped:
            os.killpg(server.pid, signal.SIGCONT)
        stop_group(server)


def test_a_compare_whose_server_dies_for_good_still_runs_every_child_and_says_what_is_missing(tmp_path):
    """The server is killed during the first method and never comes back: the second method
    cannot get a child run, runs locally all the same, and the comparison ends with its
    table, comparison.md, a warning per missing record and exit 3."""
    data, store, port, uri = a_store(tmp_path)
    server = start_mlflow_server(store, port)
    try:
        with ScriptedEndpoint(latency=0.05) as endpoint:
            kill_at_round_one = kill_at("round 1/", server)
            status, stderr = run_with(compare_command(tmp_path, data, endpoint, uri, "gone-compare", 5),
                                      kill_at_round_one)
        assert server.poll() is not None, "the server was never killed: no 'round 1/' line"
        assert status == 3, stderr[-3000:]
        table = (tmp_path / "out" / "comparison.md").read_text()
        assert "distillprompt" in table and "initial" in table
        assert {p.parent.name for p in (tmp_path / "out").rglob("result.json")} >= {"distillprompt-seed0", "initial-seed0"}
        assert "initial-seed0 runs without an MLflow run of its own" in stderr
        assert "initial-seed0 ran while the MLflow server was away" in stderr
        assert "comparison's parent run" in stderr  # its table never reached the server
    finally:
        stop_group(server)
