"""MLflow's own optimizers as compare methods (``mlflow-gepa``, ``mlflow-metaprompt``), run
through ``mlflow.genai.optimize_prompts`` against a real ``mlflow server``, on the same
scripted endpoint, response cache and samples as DistillPrompt; their optimizer-model
calls go through this project's LLM client (counted, cached)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint

IMPROVED = ("You label customer reviews.\n\n## How to decide\n- Judge the overall tone and attitude of the writer.\n"
            "- Weigh the opinion and emotion the words express.\n\nOutput format: one label.")


def capable_reflection(request: dict[str, Any], kind: str, stage: str) -> str | None:
    """GEPA's reflection prompt gets a fenced instruction, MetaPrompt's a JSON object keyed by
    the prompt name it shows; everything else is left to the scripted defaults."""
    content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
    if "within ``` blocks" in content:
        return f"Looking at the feedback, the instruction should name the cues.\n```\n{IMPROVED}\n```"
    if "valid JSON object" in content:
        names = re.findall(r"Prompt name: ?([\w.-]+)", content) or re.findall(r'"([\w.-]+)":', content)
        return json.dumps({names[0]: IMPROVED})
    return None


@pytest.fixture()
def reflective_endpoint():
    with ScriptedEndpoint(responder=capable_reflection) as server:
        yield server


def test_mlflow_optimizers_run_as_compare_methods_on_the_same_budget(mlflow_server, reflective_endpoint, reviews_dir,
                                                                     tmp_path):
    import mlflow

    args = [
        "compare", "--methods", "distillprompt,mlflow-gepa,mlflow-metaprompt,initial", "--seeds", "1", "--budget-match",
        "--dataset", str(reviews_dir), "--base-url", reflective_endpoint.base_url, "--model", "test-model",
        "--executor", "local", "--epochs", "1", "--train-size", "8", "--test-size", "10", "--experiment", "mlflow-methods",
        "--cache-path", str(tmp_path / "cache.sqlite"), "--quiet",
    ]
    completed = run_cli(*args, env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]}, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| mlflow-gepa | 1 |" in completed.stdout and "| mlflow-metaprompt | 1 |" in completed.stdout
    mlflow.set_tracking_uri(mlflow_server["uri"])
    parent_id = completed.stdout.strip().splitlines()[-1].split()[-1]
    runs = {o["method"]: o for o in mlflow.artifacts.load_dict(f"runs:/{parent_id}/comparison/runs.json")}
    # the optimizer model's calls went through this project's client: counted as meta requests
    assert runs["mlflow-gepa"]["meta_calls"] >= 1 and runs["mlflow-metaprompt"]["meta_calls"] == 1
    gepa_requests = [e for e in reflective_endpoint.requests() if "within ``` blocks" in e.content]
    assert len(gepa_requests) == runs["mlflow-gepa"]["meta_calls"]
    # the improved instruction beats the initial one on the scripted target, and is each method's result
    children = mlflow.search_runs(experiment_names=["mlflow-methods"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")
    by_method = {r.data.tags["distillprompt.method"]: r for r in children}
    assert set(by_method) == {"distillprompt", "mlflow-gepa", "mlflow-metaprompt", "initial"}
    for method in ("mlflow-gepa", "mlflow-metaprompt"):
        result = mlflow.artifacts.load_dict(f"runs:/{by_method[method].info.run_id}/result.json")
        assert result["final_prompt"].strip() == IMPROVED, method
        assert runs[method]["test_score"] >= runs["initial"]["test_score"]
    # budget match: GEPA is given DistillPrompt's scoring requests less the loop's own two train scorings
    budget = runs["distillprompt"]["scoring_calls"]
    assert by_method["mlflow-gepa"].data.params["max_scoring_calls"] == str(budget)
    # a rerun with the same seed is served by the response cache: MLflow's optimizers included
    sent = len(reflective_endpoint.requests())
    again = run_cli(*args, env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]}, timeout=1200)
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(reflective_endpoint.requests()) == sent
