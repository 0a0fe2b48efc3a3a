"""MLflow end to end against a real `mlflow server` (sqlite behind it): `mlflow run`, the
per-round record, the registered prompt and model, promotion, serving, and secrets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, run_cli, stop_group, venv_env, wait_for_http
from tests.endpoint import ScriptedEndpoint, scoring_parts, true_label

PLANTED_KEY = "sk-planted-e2e-9f3c1a7b"
PROMPT_NAME = "e2e-reviews"
MODEL_URI = f"models:/{PROMPT_NAME}-model@candidate"


def mlflow_run(server, endpoint, dataset, *params: str, entry: str = "optimize", experiment: str = "e2e"):
    command = [
        str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", entry, "--env-manager", "local",
        "--experiment-name", experiment,
        "-P", f"dataset={dataset}", "-P", f"base_url={endpoint.base_url}", "-P", "model=test-model",
        "-P", "executor=local", *[item for param in params for item in ("-P", param)],
    ]
    env = venv_env({"MLFLOW_TRACKING_URI": server["uri"], "OPENAI_API_KEY": PLANTED_KEY})
    env["DISTILLPROMPT_CACHE__ENABLED"] = "false"
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def in_fresh_python(server, code: str, python: str | Path = sys.executable, env: dict[str, str] | None = None,
                    cwd: Path | None = None) -> str:
    """Runs code in a new interpreter, as production code fetching the prompt would."""
    completed = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=300,
        env=venv_env({"MLFLOW_TRACKING_URI": server["uri"], **(env or {})}, python),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def keyed_endpoint():
    with ScriptedEndpoint(api_key=PLANTED_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def first_run(mlflow_server, keyed_endpoint, reviews_dir):
    completed = mlflow_run(
        mlflow_server, keyed_endpoint, reviews_dir,
        "epochs=2", "train_size=12", "test_size=10", "val_size=10", f"prompt_name={PROMPT_NAME}",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["e2e"], output_format="list", order_by=["start_time ASC"])[:1]
    return {"run": run, "output": completed.stdout + completed.stderr}


def test_run_records_settings_rounds_and_artifacts(first_run, mlflow_server):
    import mlflow
    from mlflow import MlflowClient

    run = first_run["run"]
    client = MlflowClient(mlflow_server["uri"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    # the MLproject's parameters as given, and the values used (a parameter left empty: the default)
    assert params["epochs"] == "2" and params["model"] == "test-model" and params["rewrites"] == "''"
    assert params["effective_rounds"] == "2" and params["effective_rewrites"] == "4"
    assert params["dataset_digest"] and params["train_examples"] == "12" and params["val_examples"] == "10"
    assert "api_key" not in params
    history = client.get_metric_history(run.info.run_id, "best_train_score")
    assert [m.step for m in history] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rewrite_mean_score")] == [1, 2]
    for name in ("llm_requests", "cache_hits", "tokens_in", "tokens_out", "cost_usd", "round_wall_time_s", "parse_rate",
                 "throttled_429", "concurrency_limit", "concurrency_peak", "concurrency_mean", "race_stopped",
                 "scoring_requests", "scoring_requests_full", "race_saved_fraction"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    # racing (the default): what each round's train scoring cost against scoring every candidate in full
    for paid, full, saved in zip(*(client.get_metric_history(run.info.run_id, name) for name in
                                   ("scoring_requests", "scoring_requests_full", "race_saved_fraction"))):
        assert 0 < paid.value <= full.value and saved.value == pytest.approx(1 - paid.value / full.value)
    # --concurrency auto (the default) against an endpoint that never throttles: no 429, and
    # the bound was used (requests were in flight) and stayed within its ceiling
    assert all(m.value == 0 for m in client.get_metric_history(run.info.run_id, "throttled_429"))
    assert all(0 < m.value <= 256 for m in client.get_metric_history(run.info.run_id, "concurrency_peak"))
    metrics = run.data.metrics
    # train proposes, validation decides: the final prompt is at least as good on validation
    assert metrics["final_val_score"] >= metrics["initial_val_score"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "best_val_score")] == [1, 2]
    assert metrics["test_improvement_ci_low"] <= metrics["paired_mean_difference"] <= metrics["test_improvement_ci_high"]
    artifacts = {
        item.path
        for folder in ("", "prompts", "plots", "candidates", "checkpoints", "method", "pareto")
        for item in client.list_artifacts(run.info.run_id, folder or None)
    }
    for expected in (
        "prompts/initial.txt", "prompts/final.txt", "plots/score_per_round.png", "plots/lineage.png", "lineage.md",
        "candidates/round_001.json", "candidates/round_002.json", "checkpoints/state.json",
        "method/meta_prompts.json", "result.json", "pareto/candidates.csv", "pareto/pareto.png", "estimate.json",
    ):
        assert expected in artifacts, expected
    # the estimate made before the run, beside what it spent
    assert int(params["estimated_requests"]) <= int(params["estimated_requests_max"])
    spent = sum(m.value for m in client.get_metric_history(run.info.run_id, "llm_requests"))
    assert 0 < spent <= int(params["estimated_requests_max"])
    table = mlflow.artifacts.load_dict(run.info.artifact_uri + "/candidates/round_001.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {row["stage"] for row in rows} == {"demos", "rewrite", "distill", "compress", "aggregate", "paraphrase"}
    assert {"round", "parents", "prompt", "train_score", "val_score", "examples_scored"} <= set(table["columns"])
    assert "candidates/round_001.json" in run.data.tags["mlflow.loggedArtifacts"]  # shown as a table in the UI
    note = run.data.tags["mlflow.note.content"]  # the run's description on its Overview page
    final = mlflow.artifacts.load_text(run.info.artifact_uri + "/prompts/final.txt")
    assert f"> {final.splitlines()[0]}" in note and f"`prompts:/{PROMPT_NAME}/1`" in note
    assert f"macro-F1: test {metrics['initial_test_score']:.4f} → {metrics['final_test_score']:.4f}" in note
    result = mlflow.artifacts.load_dict(run.info.artifact_uri + "/result.json")
    assert result["verdict"]["sentence"] in note  # whether the final prompt beat the initial one, in words
    assert run.data.tags["distillprompt.test_verdict"] == result["verdict"]["outcome"]
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["test", "train", "validation"]


def test_registered_prompt_and_model_are_fetched_by_alias(first_run, mlflow_server):
    run = first_run["run"]
    final = json.loads(
        in_fresh_python(
            mlflow_server,
            f"""
            import json, mlflow
            prompt = mlflow.genai.load_prompt("prompts:/{PROMPT_NAME}@candidate")
            run = mlflow.get_run(prompt.tags["run_id"])
            final = mlflow.artifacts.load_text(run.info.artifact_uri + "/prompts/final.txt")
            print(json.dumps({{"template": prompt.template, "tags": prompt.tags, "final": final,
                              "config": prompt.model_config, "linked": run.data.tags.get("mlflow.linkedPrompts")}}))
            """,
        ).splitlines()[-1]
    )
    assert final["tags"]["run_id"] == run.info.run_id
    assert final["final"] in final["template"] and "{{text}}" in final["template"]
    assert float(final["tags"]["test_score"]) == pytest.approx(run.data.metrics["final_test_score"], abs=1e-6)
    assert final["tags"]["test_verdict"] == run.data.tags["distillprompt.test_verdict"]
    assert final["tags"]["beat_initial_on_test"] == str(final["tags"]["test_verdict"] == "better").lower()
    low, high = run.data.metrics["test_improvement_ci_low"], run.data.metrics["test_improvement_ci_high"]
    assert final["tags"]["test_difference_ci"].endswith(f"[{low:+.4f}, {high:+.4f}]")
    assert final["config"]["model_name"] == "test-model"
    assert PROMPT_NAME in (final["linked"] or "")


def test_pyfunc_model_returns_labels(first_run, mlflow_server, keyed_endpoint):
    output = in_fresh_python(
        mlflow_server,
        f"""
        import os, pandas, mlflow
        os.environ["OPENAI_API_KEY"] = "{PLANTED_KEY}"
        model = mlflow.pyfunc.load_model("{MODEL_URI}")
        print(list(model.predict(pandas.DataFrame({{"text": ["The film was wonderful.", "The cast was awful."]}}))))
        """,
    )
    predictions = eval(output.strip().splitlines()[-1])
    assert len(predictions) == 2 and set(predictions) <= {"positive", "negative"}


@pytest.fixture(scope="module")
def model_environment(first_run, mlflow_server, tmp_path_factory) -> Path:
    """The python of a new virtual environment holding the registered model's requirements.txt
    and nothing else, as `mlflow models serve --env-manager virtualenv` or a container build
    makes it (pip, from PyPI: about a minute)."""
    import mlflow

    requirements = Path(mlflow.pyfunc.get_model_dependencies(MODEL_URI))
    # the MLflow the model was logged with, and no package of this project's own
    listed = requirements.read_text().split()
    assert f"mlflow=={mlflow.__version__}" in listed and not any("distillprompt" in line for line in listed)
    folder = tmp_path_factory.mktemp("model-env")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def test_registered_model_predicts_where_only_its_requirements_are_installed(
    first_run, mlflow_server, model_environment, tmp_path
):
    """Where the model is served, OPENAI_BASE_URL names the endpoint; its replies reason before
    the tagged answer, and the answer is read as the run read it."""
    requests = []

    def reasoning_first(request, kind, stage):
        requests.append(request)
        _, labels, text = scoring_parts(request["messages"][-1]["content"])
        label = true_label(text, labels)
        return f"Some would call it {next(other for other in labels if other != label)}; not me. <ans>{label}</ans>"

    texts = ["The film was wonderful.", "The cast was awful.", "A dull, tedious script.", "Charming and fun."]
    with ScriptedEndpoint(api_key="sk-serving-key", responder=reasoning_first) as serving:
        output = in_fresh_python(
            mlflow_server,
            f"""
            import importlib.util, json, mlflow, pandas
            assert importlib.util.find_spec("distillprompt") is None  # the model brings the code it uses
            model = mlflow.pyfunc.load_model("{MODEL_URI}")
            print(json.dumps(list(model.predict(pandas.DataFrame({{"text": {texts!r}}})))))
            """,
            python=model_environment, cwd=tmp_path,
            env={"OPENAI_BASE_URL": serving.base_url, "OPENAI_API_KEY": "sk-serving-key"},
        )
    assert json.loads(output.splitlines()[-1]) == ["positive", "negative", "negative", "positive"]
    assert len(requests) == 4 and {request["model"] for request in requests} == {"test-model"}


def test_served_model_answers_invocations(first_run, mlflow_server, keyed_endpoint, model_environment, tmp_path):
    """`mlflow models serve` in the environment of the model's requirements, on the run's endpoint."""
    port = free_port()
    answered = len(keyed_endpoint.requests(kind="scoring"))
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(model_environment.with_name("mlflow")), "models", "serve", "-m", MODEL_URI,
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=venv_env({"MLFLOW_TRACKING_URI": mlflow_server["uri"], "OPENAI_API_KEY": PLANTED_KEY}, model_environment),
            stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=120)
        except RuntimeError:
            pytest.fail(log.read_text()[-3000:])
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["A delightful, charming story."]]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_group(server)
    assert answer["predictions"][0] in ("positive", "negative")
    assert len(keyed_endpoint.requests(kind="scoring")) == answered + 1  # the run's endpoint, with its key


def test_promote_refuses_a_worse_version_unless_forced(first_run, mlflow_server, reviews_dir):
    def always_wrong(request, kind, stage):
        return "<ans>nonsense</ans>" if kind == "scoring" else None

    with ScriptedEndpoint(api_key=PLANTED_KEY, responder=always_wrong) as broken:
        completed = mlflow_run(mlflow_server, broken, reviews_dir, "epochs=1", "train_size=12", "test_size=10",
                               f"prompt_name={PROMPT_NAME}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    promoted = run_cli("promote", "--prompt-name", PROMPT_NAME, "--version", "1", env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert f"{PROMPT_NAME}@production -> version 1" in promoted.stdout
    refused = run_cli("promote", "--prompt-name", PROMPT_NAME, "--version", "2", env=env)
    assert refused.returncode == 2
    assert "below production version 1" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    forced = run_cli("promote", "--prompt-name", PROMPT_NAME, "--version", "2", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    production = in_fresh_python(
        mlflow_server,
        f"""
        import mlflow
        from mlflow import MlflowClient
        print(mlflow.genai.load_prompt("prompts:/{PROMPT_NAME}@production").version,
              MlflowClient().get_model_version_by_alias("{PROMPT_NAME}-model", "production").version)
        """,
    )
    assert production.split() == ["2", "2"]


def test_two_runs_compare_on_the_same_metrics(first_run, mlflow_server, keyed_endpoint, reviews_dir):
    import mlflow

    completed = mlflow_run(mlflow_server, keyed_endpoint, reviews_dir, "epochs=2", "train_size=12", "test_size=10",
                           "val_size=10", "seed=7", f"prompt_name={PROMPT_NAME}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["e2e"], filter_string="params.seed = '7'", output_format="list")
    assert runs
    first, second = first_run["run"], runs[0]
    shared = {"best_train_score", "final_test_score", "llm_requests", "rewrite_best_score"}
    assert shared <= set(first.data.metrics) & set(second.data.metrics)
    assert set(first.data.params) == set(second.data.params)
    assert first.data.params["dataset_digest"] != second.data.params["dataset_digest"]  # another seed, another sample


def test_mlflow_run_takes_the_settings_of_a_config_file(mlflow_server, keyed_endpoint, reviews_dir, tmp_path):
    """A parameter left empty leaves the setting to the file; one given, and a variable, beat it."""
    import mlflow

    config = tmp_path / "cfg.toml"
    config.write_text("seed = 7\n[data]\ntrain_size = 24\ntest_size = 16\n[optimizer]\nrounds = 3\npatience = 1\n"
                      "[cache]\nenabled = true\n[mlflow]\nregister_result = false\n")
    completed = mlflow_run(mlflow_server, keyed_endpoint, reviews_dir, f"config={config}", "rounds=1",
                           experiment="config-file")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["config-file"], output_format="list")
    params = run.data.params
    assert (params["train_examples"], params["test_examples"]) == ("24", "16")  # the samples drawn
    used = {name: params[f"effective_{name}"] for name in ("train_size", "test_size", "seed", "patience", "rounds",
                                                           "cache", "register")}
    assert used == {"train_size": "24", "test_size": "16", "seed": "7", "patience": "1",
                    "rounds": "1",  # -P rounds=1 beats the file's 3
                    "cache": "False",  # DISTILLPROMPT_CACHE__ENABLED=false beats the file's true
                    "register": "False"}
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "best_train_score")] == [1]
    assert "distillprompt.prompt_uri" not in run.data.tags  # register_result = false in the file


def test_evaluate_entry_point_scores_a_registered_prompt(first_run, mlflow_server, keyed_endpoint, reviews_dir):
    import mlflow

    completed = mlflow_run(
        mlflow_server, keyed_endpoint, reviews_dir, f"prompt=prompts:/{PROMPT_NAME}/1", "test_size=10",
        entry="evaluate", experiment="e2e-evaluate",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["e2e-evaluate"], output_format="list")
    assert run.data.metrics["test_score"] == pytest.approx(first_run["run"].data.metrics["final_test_score"])
    assert run.data.tags["distillprompt.method"] == "evaluate"


def test_cli_tracking_uri_starts_its_own_run(mlflow_server, keyed_endpoint, reviews_dir, tmp_path):
    import mlflow

    completed = run_cli(
        "optimize", "--dataset", str(reviews_dir), "--base-url", keyed_endpoint.base_url, "--model", "test-model",
        "--epochs", "1", "--train-size", "10", "--test-size", "10", "--executor", "local", "--no-cache",
        "--tracking-uri", mlflow_server["uri"], "--experiment", "from-cli", "--no-register",
        "--output", str(tmp_path / "out"),
        env={"OPENAI_API_KEY": PLANTED_KEY},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["from-cli"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["register"] == "False"
    assert "distillprompt.prompt_uri" not in run.data.tags  # --no-register


def test_data_checks_reach_the_run_record(mlflow_server, keyed_endpoint, tmp_path):
    import mlflow

    from tests.conftest import review_rows, write_jsonl

    folder = tmp_path / "numeric"
    train = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in review_rows(40, seed=21)]
    train[3]["label"], train[4]["text"] = None, " "
    test = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in review_rows(20, seed=22)]
    test[0]["text"] = ""
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    completed = mlflow_run(mlflow_server, keyed_endpoint, folder, "epochs=1", "train_size=8", "test_size=8",
                           "label_names=negative,positive", "prompt_name=e2e-numeric", experiment="data-checks")
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["data-checks"], output_format="list")
    params = run.data.params
    assert (params["rows_dropped_train"], params["rows_dropped_test"]) == ("2", "1")
    assert params["labels"] == "negative,positive"
    assert run.data.tags["distillprompt.label_changes"] == "labels renamed by --label-names: 0 → negative, 1 → positive"


def test_long_prompts_still_end_in_a_described_registered_run(mlflow_server, keyed_endpoint, reviews_dir, tmp_path):
    import mlflow

    initial = " ".join(["Classify the sentiment of the review as positive or negative."] * 150)  # ~9,500 characters
    completed = run_cli(
        "optimize", "--dataset", str(reviews_dir), "--base-url", keyed_endpoint.base_url, "--model", "test-model",
        "--executor", "local", "--epochs", "1", "--train-size", "8", "--test-size", "6", "--no-cache",
        "--initial-prompt", initial, "--tracking-uri", mlflow_server["uri"], "--experiment", "long-prompts",
        "--prompt-name", "long-prompt", "--output", str(tmp_path / "out"),
        env={"OPENAI_API_KEY": PLANTED_KEY},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["long-prompts"], output_format="list")
    note = run.data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.endswith("the whole prompts are in `prompts/`)")
    assert mlflow.artifacts.load_text(run.info.artifact_uri + "/prompts/initial.txt") == initial
    assert mlflow.genai.load_prompt("prompts:/long-prompt@candidate").template


def test_failed_run_registers_nothing(mlflow_server, reviews_dir, tmp_path):
    import mlflow

    with ScriptedEndpoint(api_key=PLANTED_KEY) as endpoint:
        completed = mlflow_run(mlflow_server, endpoint, reviews_dir, "epochs=1", "train_size=500",
                               "prompt_name=never-registered", experiment="e2e-failed")
    assert completed.returncode != 0
    assert "--train-size" in completed.stderr
    from mlflow import MlflowClient

    assert mlflow.genai.load_prompt("prompts:/never-registered@candidate", allow_missing=True) is None
    assert not MlflowClient(mlflow_server["uri"]).search_registered_models(filter_string="name = 'never-registered-model'")


def test_the_key_never_reaches_the_store(first_run, mlflow_server):
    """Run last in this module: every run above had the key in its environment."""
    assert PLANTED_KEY not in first_run["output"]
    found = []
    for path in [mlflow_server["db"], *Path(mlflow_server["artifacts"]).rglob("*")]:
        if path.is_file() and PLANTED_KEY.encode() in path.read_bytes():
            found.append(str(path))
    assert not found
    assert Path(mlflow_server["db"]).stat().st_size > 0
