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


# ----- requests refused for what they hold ------------------------------------------------


LONG = "The story was wonderful and the cast was great, " * 90  # about 1,100 tokens alone


@pytest.fixture(scope="module")
def reviews_with_long_ones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train and 20 test reviews: three train reviews and one test review far longer than
    a 600-token context, one of each that a content filter stops."""
    folder = tmp_path_factory.mktemp("long")
    train, test = review_rows(40, seed=21), review_rows(20, seed=22)
    for i in (4, 17, 30):
        train[i]["text"] = f"{LONG}(review {i})"
    test[6]["text"] = f"{LONG}(test review 6)"
    train[9]["text"] = "The forbidden ending was great (review 9)."
    test[11]["text"] = "The forbidden finale was awful (test review 11)."
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    return folder


def test_examples_longer_than_the_context_or_filtered_score_as_wrong_and_the_run_goes_on(
    mlflow_server, reviews_with_long_ones, tmp_path
):
    import mlflow

    with ScriptedEndpoint(context=600, flagged=("forbidden",)) as endpoint:
        completed = run_cli(*args_for(endpoint, reviews_with_long_ones, tmp_path, "--train-size", "40", "--test-size",
                                      "20", "--epochs", "2", "--scoring", "full", "--experiment", "refusals",
                                      # random examples for distillation, the long ones among them
                                      # (--distill-from errors shows none: a refusal is no mistake)
                                      "--distill-from", "random", "--no-register"),
                        env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
        log = endpoint.requests(status=None)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = result_of(tmp_path / "out")
    assert len(result["rounds"]) == 2 and result["stop_reason"] == "rounds"
    refused = {(entry["sample"], entry["example"]): entry for entry in result["refused"]}
    assert {key: list(entry["reasons"]) for key, entry in refused.items()} == {
        ("train", 4): ["context_length"], ("train", 9): ["content_filter"], ("train", 17): ["context_length"],
        ("train", 30): ["context_length"], ("test", 6): ["context_length"], ("test", 11): ["content_filter"]}
    # every prompt scored on them was refused, once each, and they count as wrong answers
    scored = [c for c in result["history"] if c["duplicate_of"] is None and c["score"] is not None]
    assert all(c["refused"] == 4 for c in scored) and all(c["parse_rate"] <= 36 / 40 for c in scored)
    assert sum(entry["requests"] for key, entry in refused.items() if key[0] == "train") == 4 * len(scored)
    test_runs = 1 if result["final_candidate"] == 0 else 2
    assert refused[("test", 6)]["requests"] == test_runs
    outputs = result["test_outputs"]["initial"]
    assert outputs[[i for i, row in enumerate(outputs) if not row["output"]][0]]["score"] == 0.0
    assert "refused by the endpoint: 6 examples (train 4, test 2; content_filter 2, context_length 4)" in completed.stdout
    assert completed.stderr.count("refused a request") == 2  # said once per reason
    scoring_refusals = [e for e in log if e.status == 400 and e.kind == "scoring"]
    assert len(scoring_refusals) == sum(entry["requests"] for entry in result["refused"])
    assert result["usage"]["total"]["failed"] == 0 and result["usage"]["total"]["retries"] == 0
    # a distillation that showed a long review was asked again with fewer examples, not dropped
    distills = [e for e in log if e.stage == "distill"]
    assert any(e.refused == "context_length" for e in distills)
    assert not result["rejections"].get("distill", {}).get("context_length")
    # four distillations a round, each answered (and made a candidate)
    assert Counter(c["round"] for c in result["history"] if c["stage"] == "distill") == {1: 4, 2: 4}

    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["refusals"], output_format="list")
    assert run.data.metrics["refused_examples"] == 6
    assert run.data.metrics["total_refused_requests"] == result["usage"]["total"]["refusals"]
    table = mlflow.artifacts.load_dict(run.info.artifact_uri + "/candidates/round_001.json")
    assert {row[table["columns"].index("refused")] for row in table["data"]} == {4}
    assert mlflow.artifacts.load_dict(run.info.artifact_uri + "/result.json")["refused"] == result["refused"]


def test_a_meta_prompt_too_long_for_the_context_is_dropped_and_counted(reviews_dir, tmp_path):
    aspects = ["plot", "cast", "music", "pacing", "ending", "camera", "script", "dialogue", "acting", "sets", "score",
               "costumes", "editing", "humour", "tension", "lighting", "sound", "effects", "length", "tone"]
    instruction = "Decide whether the review is positive or negative. " + " ".join(
        f"Note what the writer says about the {aspect} and how strongly." for aspect in aspects)
    # about 360 tokens a scoring request, 440 the rewrite's meta-prompt
    with ScriptedEndpoint(context=400) as endpoint:
        completed = run_cli(*args_for(endpoint, reviews_dir, tmp_path, "--initial-prompt", instruction, "--demos", "0"))
        log = endpoint.requests(status=None)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = result_of(tmp_path / "out")
    assert result["rejections"]["rewrite"] == {"context_length": 4}  # the four replies asked for
    assert "dropped meta-replies: rewrite 4 (context_length 4)" in completed.stdout
    assert [e.refused for e in log if e.stage == "rewrite"] == ["context_length"]  # asked once, not retried
    assert not [e for e in log if e.kind == "scoring" and e.status != 200]


def test_an_endpoint_that_refuses_every_request_of_the_initial_prompt_is_a_setting_to_fix(reviews_dir, tmp_path):
    with ScriptedEndpoint(context=40) as endpoint:
        completed = run_cli(*args_for(endpoint, reviews_dir, tmp_path, "--quiet"))
    one_line_error(completed, "refused the initial prompt's request for every one of the 12 train examples",
                   "--answer-max-tokens")
    assert not endpoint.requests()  # nothing answered, nothing paid
    assert not (tmp_path / "out").exists()


# ----- a run that ends early keeps what it paid for ----------------------------------------


def stop_after_round_one(endpoint: ScriptedEndpoint, args: list[str], stop) -> subprocess.CompletedProcess:
    """Runs the CLI and calls ``stop(process)`` once round 1 is done."""
    process = subprocess.Popen([sys.executable, "-m", "distillprompt", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=venv_env(), cwd=ROOT)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("round 1 done"):
            break
    stop(process)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, "".join(seen) + stderr)


def test_a_key_revoked_mid_run_ends_with_its_line_and_result_json_holds_what_was_paid_for(reviews_dir, tmp_path):
    with ScriptedEndpoint(api_key="first-key", latency=0.01) as endpoint:
        args = args_for(endpoint, reviews_dir, tmp_path, "--epochs", "3", "--api-key", "first-key")

        def revoke(process):
            endpoint.api_key = "another-key"

        completed = stop_after_round_one(endpoint, args, revoke)
        paid = len(endpoint.requests())
    assert completed.returncode == 2, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("distillprompt: error")]
    assert len(errors) == 1 and "rejected the API key (401" in errors[0] and "Traceback" not in completed.stderr
    assert "what it paid for" in completed.stderr
    result = result_of(tmp_path / "out")
    assert result["stop_reason"] == "error" and "401" in result["failure"]
    assert {c["round"] for c in result["history"]} >= {0, 1} and len(result["rounds"]) == 1
    assert result["usage"]["total"]["requests"] == paid  # every answered request, in the record
    assert result["final_prompt"] == max((c for c in result["history"] if c["round"] <= 1 and c["score"] is not None),
                                         key=lambda c: (c["score"], -c["id"]))["prompt"]


def test_ctrl_c_mid_run_leaves_result_json(reviews_dir, tmp_path):
    with ScriptedEndpoint(latency=0.01) as endpoint:
        completed = stop_after_round_one(endpoint, args_for(endpoint, reviews_dir, tmp_path, "--epochs", "3"),
                                         lambda process: process.send_signal(signal.SIGINT))
    assert completed.returncode == 130, completed.stderr[-3000:]
    result = result_of(tmp_path / "out")
    assert result["stop_reason"] == "interrupted" and len(result["rounds"]) >= 1
    assert result["usage"]["total"]["requests"] > 0


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_first_request(endpoint, reviews_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = args_for(endpoint, reviews_dir, tmp_path)
    args[args.index("--output") + 1] = str(blocker / "out")
    one_line_error(run_cli(*args), f"cannot write result.json to {blocker / 'out'}", "--output")
    assert not endpoint.requests(status=None)
