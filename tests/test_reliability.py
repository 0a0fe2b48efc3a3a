"""Reliability: a killed run resumed, faulty endpoints, an endpoint that gives up, and secrets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, venv_env
from tests.endpoint import ScriptedEndpoint

TRANSPORT_FAULTS = {"429": 0.05, "429:0.1": 0.05, "500": 0.05, "drop": 0.05}


def optimize_args(endpoint, dataset, tmp_path, *extra: str, cache: str = "cache.sqlite") -> list[str]:
    return [
        "optimize", "--dataset", str(dataset), "--base-url", endpoint.base_url, "--model", "test-model",
        "--train-size", "12", "--test-size", "10", "--seed", "3", "--executor", "local",
        "--cache-path", str(tmp_path / cache), "--backoff-base", "0.01", "--backoff-max", "0.05",
        *extra,
    ]


def result_of(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def same_outcome(a: dict, b: dict) -> None:
    assert a["final_prompt"] == b["final_prompt"]
    assert a["final_scores"] == b["final_scores"]
    assert a["initial_scores"] == b["initial_scores"]
    assert [c["prompt"] for c in a["history"]] == [c["prompt"] for c in b["history"]]


def test_transport_faults_are_retried_never_scored(reviews_dir, tmp_path):
    with ScriptedEndpoint() as clean:
        assert run_cli(*optimize_args(clean, reviews_dir, tmp_path, "--epochs", "2", "--output", str(tmp_path / "clean"),
                                      cache="clean.sqlite")).returncode == 0
        clean_requests = Counter(e.body_hash for e in clean.requests())
    with ScriptedEndpoint(rates=dict(TRANSPORT_FAULTS)) as faulty:
        completed = run_cli(*optimize_args(faulty, reviews_dir, tmp_path, "--epochs", "2", "--output", str(tmp_path / "faulty"),
                                           cache="faulty.sqlite"))
        assert completed.returncode == 0, completed.stderr[-2000:]
        answered = Counter(e.body_hash for e in faulty.requests())  # status 200 only
        statuses = Counter(e.status for e in faulty.requests(status=None))
    assert statuses[429] and statuses[500] and statuses[0], statuses  # every kind of fault happened
    same_outcome(result_of(tmp_path / "faulty"), result_of(tmp_path / "clean"))
    assert answered == clean_requests  # each request answered exactly once: none lost, none twice
    usage = result_of(tmp_path / "faulty")["usage"]["total"]
    assert usage["retries"] == statuses[429] + statuses[500] + statuses[0] and usage["failed"] == 0


def test_content_faults_complete_and_are_counted(reviews_dir, tmp_path):
    with ScriptedEndpoint(rates={**TRANSPORT_FAULTS, "empty": 0.03, "tagless": 0.02}) as faulty:
        completed = run_cli(*optimize_args(faulty, reviews_dir, tmp_path, "--epochs", "2", "--output", str(tmp_path / "out")))
        answered = faulty.requests()  # status 200, content faults included
        statuses = Counter(e.status for e in faulty.requests(status=None))
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = result_of(tmp_path / "out")
    scored = [c for c in result["history"] if c["duplicate_of"] is None]
    assert all(c["score"] is not None for c in scored)  # an empty or tagless answer is a wrong answer, not a crash
    assert len({e.body_hash for e in answered}) == len(answered)  # no request answered twice
    assert result["usage"]["total"]["retries"] == statuses[429] + statuses[500] + statuses[0]


def fail_after_round_one(endpoint: ScriptedEndpoint, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Runs ``distillprompt`` with ``args``; round 1 runs clean, and from the first request of
    round 2 on the endpoint answers 500. The exit code and stderr."""
    process = subprocess.Popen([sys.executable, "-m", "distillprompt", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=venv_env(env), cwd=ROOT)
    progress = []
    assert process.stderr is not None
    for line in process.stderr:  # the progress display reports each finished round
        progress.append(line)
        if line.startswith("round 1 done"):
            break
    endpoint.rates = {"500": 1.0}
    _, stderr = process.communicate(timeout=300)
    return process.returncode, "".join(progress) + stderr


def test_an_outage_stops_the_run_cleanly_and_mlflow_run_resumes_it(mlflow_server, reviews_dir, tmp_path):
    import mlflow

    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    with ScriptedEndpoint() as endpoint:
        args = optimize_args(endpoint, reviews_dir, tmp_path, "--epochs", "3", "--max-retries", "2",
                             "--experiment", "outage", "--prompt-name", "outage-prompt", "--output", str(tmp_path / "out"))
        code, stderr = fail_after_round_one(endpoint, args, env)
        assert code == 1, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.startswith("distillprompt: error")]
        assert len(lines) == 1 and "gave up" in lines[0] and "result.json" in lines[0], stderr[-3000:]
        result = result_of(tmp_path / "out")
        assert result["stop_reason"] == "endpoint_unavailable" and "500" in result["failure"]
        assert {c["round"] for c in result["history"]} <= {0, 1}  # the unfinished round is not kept
        assert result["final_prompt"] == max(result["history"], key=lambda c: (c["score"], -c["id"]))["prompt"]
        assert result["usage"]["total"]["failed"] >= 1

        mlflow.set_tracking_uri(mlflow_server["uri"])
        client = mlflow.MlflowClient()
        (run,) = mlflow.search_runs(experiment_names=["outage"], output_format="list")
        assert run.info.status == "FAILED"
        assert run.data.tags["distillprompt.stop_reason"] == "endpoint_unavailable"
        assert "500" in run.data.tags["distillprompt.failure"]
        assert run.data.metrics["total_failed_requests"] >= 1
        assert [m.step for m in client.get_metric_history(run.info.run_id, "best_train_score")] == [1]
        assert mlflow.genai.load_prompt("prompts:/outage-prompt@candidate", allow_missing=True) is None
        assert f"`--resume {run.info.run_id}` continues" in run.data.tags["mlflow.note.content"]

        # The endpoint is back: `mlflow run -P resume_run_id=...` continues the same run from round 2.
        paid = {e.body_hash for e in endpoint.requests()}
        endpoint.rates = {}
        endpoint.reset()
        resumed = subprocess.run(
            [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "optimize", "--env-manager", "local",
             "--experiment-name", "outage", "-P", f"resume_run_id={run.info.run_id}"],
            capture_output=True, text=True, env=venv_env(env), cwd=ROOT, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "round 2/3" in resumed.stderr and "round 1/3" not in resumed.stderr  # it starts at round 2 of the run's 3
        assert endpoint.requests() and not paid & {e.body_hash for e in endpoint.requests()}  # nothing paid twice
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["distillprompt.stop_reason"] == "rounds"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "best_train_score")] == [1, 2, 3]
    assert mlflow.genai.load_prompt("prompts:/outage-prompt@candidate").template
    assert "Failed" not in finished.data.tags["mlflow.note.content"]  # the description tells the final outcome


@pytest.fixture()
def slow_endpoint():
    with ScriptedEndpoint(latency=0.02) as server:
        yield server


def test_a_run_killed_in_round_two_resumes_to_the_same_result(mlflow_server, slow_endpoint, reviews_dir, tmp_path):
    import mlflow

    endpoint = slow_endpoint
    mlflow.set_tracking_uri(mlflow_server["uri"])
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    base = optimize_args(endpoint, reviews_dir, tmp_path, "--epochs", "3", "--experiment", "resume", "--no-register",
                         "--output", str(tmp_path / "killed"))
    process = subprocess.Popen([sys.executable, "-m", "distillprompt", *base], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=venv_env(env), cwd=ROOT)
    deadline = time.monotonic() + 120
    run_id = None
    checkpoint: list[Path] = []  # round 1's checkpoint, as the server stored it (the tracker's queue wrote it)
    while time.monotonic() < deadline:  # mid round 2, once round 1's checkpoint is recorded
        if run_id is None:
            runs = mlflow.search_runs(experiment_names=["resume"], output_format="list")
            run_id = runs[0].info.run_id if runs else None
        else:
            checkpoint = checkpoint or list(Path(mlflow_server["artifacts"]).glob(
                f"*/{run_id}/artifacts/checkpoints/state.json"))
        if checkpoint and len(endpoint.requests(kind="meta", stage="distill")) >= 6:
            break
        time.sleep(0.005)
    process.kill()
    process.wait(30)
    time.sleep(0.5)  # requests the killed process left in flight reach the log
    killed_part = {e.body_hash for e in endpoint.requests()}
    import sqlite3

    with sqlite3.connect(tmp_path / "cache.sqlite") as db:  # the replies the killed process received and kept
        completed = db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    in_flight = len(killed_part) - completed  # sent, but killed before the reply was kept
    assert completed > 0 and in_flight >= 0
    (run,) = mlflow.search_runs(experiment_names=["resume"], output_format="list")
    assert run.info.status == "RUNNING"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "best_train_score")) == 1

    endpoint.reset()
    resumed = run_cli("optimize", "--resume", run.info.run_id, "--output", str(tmp_path / "resumed"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_part = {e.body_hash for e in endpoint.requests()}
    # Nothing the killed part completed is asked again: the only repeats are the requests
    # it had in flight when it was killed.
    assert resumed_part and len(resumed_part & killed_part) <= in_flight

    endpoint.reset()
    straight = run_cli(*optimize_args(endpoint, reviews_dir, tmp_path, "--epochs", "3", "--no-register",
                                      "--experiment", "straight", "--output", str(tmp_path / "straight"),
                                      cache="straight.sqlite"), env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    same_outcome(result_of(tmp_path / "resumed"), result_of(tmp_path / "straight"))

    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "best_train_score")]
    assert steps == [1, 2, 3]  # the same MLflow run, every round once
    assert finished.data.tags["distillprompt.resumed_from_round"] == "1"


RESUME_KEY = "sk-resume-only-by-flag-4b7e"


def test_resume_takes_the_key_and_the_flags_that_keep_the_run_and_refuses_the_others(mlflow_server, reviews_dir,
                                                                                       tmp_path):
    """The key is in no environment: the first run and its resume get it by --api-key."""
    import mlflow

    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    mlflow.set_tracking_uri(mlflow_server["uri"])
    client = mlflow.MlflowClient()
    with ScriptedEndpoint(api_key=RESUME_KEY) as endpoint:
        args = optimize_args(endpoint, reviews_dir, tmp_path, "--epochs", "2", "--max-retries", "1", "--no-register",
                             "--experiment", "resume-flags", "--api-key", RESUME_KEY, "--output", str(tmp_path / "out"))
        code, stderr = fail_after_round_one(endpoint, args, env)
        assert code == 1, stderr[-2000:]
        (run,) = mlflow.search_runs(experiment_names=["resume-flags"], output_format="list")
        run_id = run.info.run_id
        endpoint.rates = {}
        endpoint.reset()

        # settings that would change the recorded run: refused, all in one line; nothing sent
        refused = run_cli("optimize", "--resume", run_id, "--api-key", RESUME_KEY, "--train-size", "30",
                          "--seed", "9", env=env)
        one_line_error(refused, "--train-size 30 (the run has 12)", "--seed 9 (the run has 3)", "without --resume")

        # a checkpoint this version cannot read is refused, never started again from round 0
        checkpoint = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/checkpoints/state.json")
        for unreadable, fragment in (({**checkpoint, "schema_version": 99}, "upgrade distillprompt"),
                                     ({"schema_version": 3, "seed": 3}, "cannot be read")):
            client.log_dict(run_id, unreadable, "checkpoints/state.json")
            one_line_error(run_cli("optimize", "--resume", run_id, "--api-key", RESUME_KEY, env=env), fragment)
        client.log_dict(run_id, checkpoint, "checkpoints/state.json")
        assert not endpoint.requests(status=None)
        assert "distillprompt.resumed_from_round" not in mlflow.get_run(run_id).data.tags

        # the key, budgets, concurrency, tracking and output given again are taken; a setting
        # given with the run's own value is no change
        resumed = run_cli("optimize", "--resume", run_id, "--api-key", RESUME_KEY, "--seed", "3", "--max-calls",
                          "100000", "--concurrency", "4", "--tracking-wait", "5", "--output", str(tmp_path / "resumed"),
                          env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert endpoint.requests()  # round 2 answered: the endpoint answers 401 to a request without the key
    assert RESUME_KEY not in resumed.stdout + resumed.stderr
    settings = result_of(tmp_path / "resumed")["settings"]
    assert (settings["max_calls"], settings["concurrency"], settings["tracking_wait"]) == (100000, 4, 5.0)
    assert (settings["train_size"], settings["seed"], settings["rounds"]) == (12, 3, 2)  # the run's own
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["distillprompt.resumed_from_round"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "best_train_score")] == [1, 2]


# ----- bad input: one line naming the fix, exit code 2 ------------------------------------


class HtmlServer:
    """An HTTP server that is not an OpenAI-compatible API (a web page on every route)."""

    def __enter__(self):
        import http.server
        import threading

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"<html><body>Welcome</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def one_line_error(completed, *fragments: str) -> None:
    assert completed.returncode == 2, (completed.stdout[-1000:], completed.stderr[-2000:])
    lines = [line for line in completed.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_fractional_labels_are_not_classes(endpoint, tmp_path):
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i / 7}) + "\n" for i in range(40)))
    one_line_error(run_cli(*optimize_args(endpoint, data, tmp_path)), "--task generation")


def test_an_endpoint_that_is_not_openai_compatible(reviews_dir, tmp_path):
    with HtmlServer() as page:
        one_line_error(run_cli(*optimize_args(page, reviews_dir, tmp_path)), "OpenAI-compatible", "--base-url")


def test_a_model_the_endpoint_does_not_serve(endpoint, reviews_dir, tmp_path):
    args = optimize_args(endpoint, reviews_dir, tmp_path)
    args[args.index("test-model")] = "gpt-nonexistent"
    one_line_error(run_cli(*args), "does not serve model 'gpt-nonexistent'", "test-model")


def test_an_unreachable_tracking_server(endpoint, reviews_dir, tmp_path):
    with ScriptedEndpoint() as gone:
        pass
    completed = run_cli(*optimize_args(endpoint, reviews_dir, tmp_path, "--tracking-uri", f"http://127.0.0.1:{gone.port}"))
    one_line_error(completed, "cannot reach the MLflow tracking server", "--tracking-uri")


def test_a_registry_name_that_is_not_allowed(endpoint, reviews_dir, tmp_path):
    completed = run_cli(*optimize_args(endpoint, reviews_dir, tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                       "--prompt-name", "my prompt/v1"))
    one_line_error(completed, "registry name 'my prompt/v1' is not allowed")
    assert not endpoint.requests()  # refused before any paid work


def test_resume_without_tracking(endpoint, reviews_dir, tmp_path):
    one_line_error(run_cli(*optimize_args(endpoint, reviews_dir, tmp_path, "--resume", "abc123")), "--tracking-uri")


# ----- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "flag", "config"])
def test_a_planted_key_reaches_no_log_run_artifact_trace_or_checkpoint(mlflow_server, reviews_dir, tmp_path, source):
    import mlflow

    key = f"sk-planted-{source}-5e1d0c"
    with ScriptedEndpoint(api_key=key) as guarded:
        env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
        extra: list[str] = ["--epochs", "1", "--trace", "--experiment", f"secrets-{source}",
                            "--prompt-name", f"secret-check-{source}", "--output", str(tmp_path / "out")]
        if source == "env":
            env["OPENAI_API_KEY"] = key
        elif source == "flag":
            extra += ["--api-key", key]
        else:
            config = tmp_path / "run.toml"
            config.write_text(f'[llm]\napi_key = "{key}"\n')
            extra += ["--config", str(config)]
        completed = run_cli(*optimize_args(guarded, reviews_dir, tmp_path, *extra), env=env)
        assert completed.returncode == 0, completed.stderr[-3000:]
        # a failing run: its error message must not carry the key either
        failed = run_cli(*optimize_args(guarded, reviews_dir, tmp_path, "--train-size", "999", *extra), env=env)
        assert failed.returncode == 2
    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=[f"secrets-{source}"], filter_string="status = 'FINISHED'",
                                output_format="list")
    traces = mlflow.search_traces(locations=[run.info.experiment_id], return_type="list")
    assert traces, "--trace recorded no trace"
    texts = [completed.stdout, completed.stderr, failed.stdout, failed.stderr,
             json.dumps(run.data.params), json.dumps(run.data.tags),
             json.dumps([trace.to_dict() for trace in traces], default=str)]
    files = [mlflow_server["db"], *Path(mlflow_server["artifacts"]).rglob("*"), *(tmp_path / "out").rglob("*")]
    assert (tmp_path / "out" / "state.json").is_file() and (tmp_path / "out" / "result.json").is_file()
    leaks = [i for i, text in enumerate(texts) if key in text]
    leaks += [str(path) for path in files if path.is_file() and key.encode() in path.read_bytes()]
    assert not leaks
