"""Endpoints as they are: a run against one that refuses as OpenAI's reasoning models do, one
whose context some examples do not fit, a content filter, and runs that end early after
paying (result.json holds what was paid for)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, review_rows, run_cli, venv_env, write_jsonl
from tests.endpoint import REASONING_TOKENS, ScriptedEndpoint
from tests.test_mlflow import in_fresh_python
from tests.test_reliability import one_line_error


def args_for(endpoint: ScriptedEndpoint, dataset: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "optimize", "--dataset", str(dataset), "--base-url", endpoint.base_url, "--model", "test-model",
        "--train-size", "12", "--test-size", "10", "--seed", "3", "--executor", "local", "--epochs", "1",
        "--cache-path", str(tmp_path / "cache.sqlite"), "--output", str(tmp_path / "out"), *extra,
    ]


def result_of(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


# ----- OpenAI's reasoning models --------------------------------------------------------------


def test_a_run_against_an_endpoint_that_refuses_as_openai_reasoning_models_do(mlflow_server, reviews_dir, tmp_path):
    """max_tokens and temperature 0 refused (400, OpenAI's bodies), n refused too: the run
    learns each once, goes on and ends with exit 0 and a result. The only refused requests
    are those in flight when the first refusal of their parameter came back; every request
    after carries what the endpoint takes, with room to reason; reasoning tokens are counted
    and paid; the registered model sends what the endpoint takes."""
    with ScriptedEndpoint(reasoning=True, refuse_n=True, latency=0.01) as endpoint:
        completed = run_cli(*args_for(endpoint, reviews_dir, tmp_path, "--concurrency", "4", "--price-output", "10",
                                      "--experiment", "reasoning", "--prompt-name", "reasoning-prompt"),
                            env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
        log = endpoint.requests(status=None)
        # the registered model, loaded as production code would, sends what the endpoint takes
        output = in_fresh_python(mlflow_server, """
            import json, pandas, mlflow
            model = mlflow.pyfunc.load_model("models:/reasoning-prompt-model@candidate")
            config = model.model_config["distillprompt"]
            predictions = list(model.predict(pandas.DataFrame({"text": ["The film was wonderful.", "It was awful."]})))
            print(json.dumps({"config": config, "predictions": predictions}))
            """) if completed.returncode == 0 else ""
        served = endpoint.requests(status=None)[len(log):]
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = result_of(tmp_path / "out")
    assert result["stop_reason"] == "rounds" and result["final_prompt"] in completed.stdout
    # said once each
    for name in ("max_tokens", "temperature", "n"):
        assert completed.stderr.count(f"does not take '{name}'") == 1, completed.stderr[-3000:]

    refused = {name: [e for e in log if e.refused == name] for name in ("max_tokens", "temperature", "n")}
    answered = [e for e in log if e.status == 200]
    assert set(Counter(e.status for e in log)) == {200, 400}
    assert all(refused.values()) and len(log) == len(answered) + sum(map(len, refused.values()))
    # only what was in flight: at most --concurrency of each, all of them sent before the first
    # request that carried the fix (which went out once the first refusal was back)
    carries_fix = {"max_tokens": lambda e: "max_completion_tokens" in e.parameters,
                   "temperature": lambda e: "temperature" not in e.parameters and "max_completion_tokens" in e.parameters}
    for name, fixed in carries_fix.items():
        first_fixed = min(e.arrived for e in log if fixed(e))
        assert len(refused[name]) <= 4 and all(e.arrived < first_fixed for e in refused[name]), name
    assert len(refused["n"]) == 1  # the one request for several samples in flight then
    # what every answered request carried: the limit under the name the endpoint takes, with room to reason
    assert all("max_completion_tokens" in e.parameters and not {"max_tokens", "temperature", "n"} & set(e.parameters)
               for e in answered)
    assert {e.max_completion_tokens for e in answered if e.kind == "scoring"} == {256 + 8192}
    assert {e.max_completion_tokens for e in answered if e.kind == "meta"} == {1024 + 8192}
    # room to think: every answer parsed (without it, 300 tokens of reasoning leave nothing of 256)
    assert result["final_scores"]["train"]["parse_rate"] == 1.0 and result["final_scores"]["test"]["parse_rate"] == 1.0
    usage = result["usage"]["total"]
    assert usage["reasoning_tokens"] == sum(REASONING_TOKENS[e.kind] for e in answered)
    assert usage["output_tokens"] > usage["reasoning_tokens"]
    assert usage["cost"] == pytest.approx(usage["output_tokens"] * 10 / 1e6)
    assert usage["parameter_refusals"] == sum(map(len, refused.values())) and usage["failed"] == 0
    assert result["endpoint"]["target"] == {"model": "test-model", "token_limit": "max_completion_tokens",
                                            "left_out": ["n", "temperature"], "reasoning_room": 8192,
                                            "context_tokens": None}

    # the registered model's requests: no refusal
    model = json.loads(output.strip().splitlines()[-1])
    assert model["config"]["token_limit"] == "max_completion_tokens" and model["config"]["max_tokens"] == 256 + 8192
    assert set(model["config"]["left_out"]) == {"n", "temperature"}
    assert set(model["predictions"]) <= {"positive", "negative"} and None not in model["predictions"]
    assert len(served) == 2 and all(e.status == 200 and "temperature" not in e.parameters for e in served)
