"""Credentials in URLs: an endpoint behind basic auth (``http://user:password@host/v1``) and a
token in a URL's query are sent, and found in no printed line, no file of the run's output, the
MLflow store (database and artifacts, the registered model included) or the response cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, venv_env
from tests.endpoint import ScriptedEndpoint

TARGET_PASSWORD = "pw-target-7d41c0"
WRITER_PASSWORD = "pw-writer-2e9b85"
QUERY_TOKEN = "sig-token-a61f33"
TRACKING_PASSWORD = "pw-tracking-5c0d17"
RAY_PASSWORD = "pw-ray-93ab4e"
KEY = "sk-key-beside-basic-auth-0f2a"
PLANTED = (TARGET_PASSWORD, WRITER_PASSWORD, QUERY_TOKEN, TRACKING_PASSWORD, RAY_PASSWORD, KEY)


def leaks(texts: list[str], files: list[Path]) -> list[str]:
    found = [f"text {i}: {secret}" for i, text in enumerate(texts) for secret in PLANTED if secret in text]
    for path in files:
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {secret}" for secret in PLANTED if secret.encode() in data]
    return found


def in_fresh_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=venv_env(env), timeout=300)


@pytest.fixture()
def endpoints():
    with ScriptedEndpoint(basic_auth=("proxy-user", TARGET_PASSWORD)) as target, \
            ScriptedEndpoint(basic_auth=("writer", WRITER_PASSWORD), query={"sig": QUERY_TOKEN}) as writer:
        yield target, writer


def test_credentials_in_urls_are_sent_and_never_shown_or_recorded(mlflow_server, endpoints, reviews_dir, tmp_path):
    import mlflow

    target, writer = endpoints
    target_url = f"http://proxy-user:{TARGET_PASSWORD}@127.0.0.1:{target.port}/v1"
    writer_url = f"http://writer:{WRITER_PASSWORD}@127.0.0.1:{writer.port}/v1?sig={QUERY_TOKEN}"
    tracking = mlflow_server["uri"].replace("http://", f"http://tracker:{TRACKING_PASSWORD}@")
    env = {"OPENAI_API_KEY": KEY, "RAY_ADDRESS": f"ray://ray-user:{RAY_PASSWORD}@127.0.0.1:1"}  # --executor local
    common = ["--dataset", str(reviews_dir), "--model", "test-model", "--train-size", "12", "--test-size", "10",
              "--executor", "local", "--tracking-uri", tracking, "--cache-path", str(tmp_path / "cache.sqlite")]
    completed = run_cli("optimize", *common, "--base-url", target_url, "--optimizer-base-url", writer_url,
                        "--epochs", "1", "--trace", "--experiment", "url-secrets", "--prompt-name", "url-secrets",
                        "--output", str(tmp_path / "out"), env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # the credentials reached both endpoints (each answers 401 without its own)
    assert target.requests(kind="scoring") and writer.requests(kind="meta")
    assert "the API key is not sent" in completed.stderr  # basic auth takes the Authorization header

    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["url-secrets"], output_format="list")
    params = run.data.params
    assert params["base_url"] == f"http://***@127.0.0.1:{target.port}/v1"
    assert params["optimizer_base_url"] == f"http://***@127.0.0.1:{writer.port}/v1?sig=***"
    assert params["tracking_uri"].startswith("http://***@") and params["ray_address"] == "ray://***@127.0.0.1:1"
    prompt = mlflow.genai.load_prompt("prompts:/url-secrets@candidate")
    assert prompt.model_config["extra_params"]["base_url"] == params["base_url"]

    # a wrong password: refused in one line, which shows the URL masked
    wrong = run_cli("optimize", *common, "--base-url", target_url.replace(TARGET_PASSWORD, "pw-wrong-1b2c"),
                    "--output", str(tmp_path / "wrong"), env=env)
    assert wrong.returncode == 2 and "rejected the user and password in its URL" in wrong.stderr
    assert "pw-wrong-1b2c" not in wrong.stderr
    # --resume cannot take the masked URLs from the record: it asks for them, in one line
    resumed = run_cli("optimize", "--resume", run.info.run_id, "--tracking-uri", tracking, env=env)
    assert resumed.returncode == 2 and "give --base-url and --optimizer-base-url again" in resumed.stderr
    # inside `mlflow run`, a URL with credentials in -P is refused (MLflow logs parameters as given)
    parameter = subprocess.run([sys.executable, "-m", "mlflow_project", "optimize", "--base_url", target_url],
                               capture_output=True, text=True, env=venv_env(), cwd=ROOT, timeout=120)
    assert parameter.returncode == 2 and "carries credentials" in parameter.stderr

    # the registered model serves once OPENAI_BASE_URL gives the credentials where it runs
    predict = f"""
        import mlflow, pandas
        model = mlflow.pyfunc.load_model("models:/url-secrets-model@candidate")
        print(list(model.predict(pandas.DataFrame({{"text": ["A delightful, charming story."]}}))))
        """
    served = in_fresh_python(predict, {"MLFLOW_TRACKING_URI": mlflow_server["uri"], "OPENAI_BASE_URL": target_url})
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip().splitlines()[-1] in ("['positive']", "['negative']")
    unserved = in_fresh_python(predict, {"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
    assert unserved.returncode != 0 and "set OPENAI_BASE_URL" in unserved.stderr

    texts = [completed.stdout, completed.stderr, wrong.stdout, wrong.stderr, resumed.stdout, resumed.stderr,
             parameter.stdout, parameter.stderr, served.stdout, served.stderr, unserved.stdout, unserved.stderr,
             json.dumps(params), json.dumps(run.data.tags), json.dumps(prompt.model_config)]
    files = [*(tmp_path / "out").rglob("*"), tmp_path / "cache.sqlite", mlflow_server["db"],
             *Path(mlflow_server["artifacts"]).rglob("*")]
    assert (tmp_path / "out" / "result.json").is_file()
    assert any(path.name == "MLmodel" for path in files)  # the registered model's files are searched too
    assert not leaks(texts, files)
