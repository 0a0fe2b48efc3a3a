"""Rounds without signal are named, and the run stops paying for them; copies are asked again."""

from __future__ import annotations

import asyncio
import json

from distillprompt import runner
from distillprompt.settings import load_settings
from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint


def settings_for(endpoint: ScriptedEndpoint, dataset, tmp_path, **optimizer):
    return load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01},
        "data": {"dataset": str(dataset), "train_size": 12, "test_size": 10},
        "optimizer": optimizer,
        "cache": {"enabled": False},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })


def one_label(request, kind, stage):
    return "<ans>negative</ans>" if kind == "scoring" else None


def test_a_target_that_gives_one_label_stops_the_run_after_two_rounds(reviews_dir, tmp_path):
    with ScriptedEndpoint(responder=one_label) as endpoint:
        result, folder = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path / "a", epochs=5)))
        requests = len(endpoint.requests())
    with ScriptedEndpoint(responder=one_label) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path / "b", epochs=2, stop_when_flat=False)
        two_rounds, _ = asyncio.run(runner.optimize(settings))
        requests_of_two_rounds = len(endpoint.requests())
    assert result.stop_reason == "flat_signal"
    assert len(result.rounds) == 2
    assert requests == requests_of_two_rounds  # nothing paid beyond the second round
    assert two_rounds.stop_reason == "rounds"
    for summary in result.rounds:
        diagnosis = summary.diagnosis
        assert diagnosis.flat and diagnosis.reason == "constant_answer"
        assert diagnosis.top_answer == "negative" and diagnosis.top_answer_count == 12
    assert "answered 'negative' to 12 of 12 inputs" in result.diagnosis
    assert "larger target model" in result.diagnosis
    saved = json.loads((folder / "result.json").read_text())
    assert saved["diagnosis"] == result.diagnosis and saved["stop_reason"] == "flat_signal"


def test_a_target_that_follows_the_instruction_runs_every_round(endpoint, reviews_dir, tmp_path):
    result, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path, epochs=3)))
    assert result.stop_reason == "rounds" and len(result.rounds) == 3
    assert result.diagnosis is None
    assert all(not r.diagnosis.flat and r.diagnosis.spread > 1 / 12 for r in result.rounds)


def test_a_copy_of_the_parent_is_asked_once_more_at_a_higher_temperature(reviews_dir, tmp_path):
    def copying(request, kind, stage):
        if kind == "meta" and stage == "rewrite":
            content = request["messages"][0]["content"]
            parent = content.split("Instruction:\n", 1)[1].split("\n\n")[0]
            if request["temperature"] < 1.0:
                return f"<START>{parent}<END>"  # a copy of the prompt it was given
            return f"<START>{parent} Weigh the overall sentiment ({request['seed']}).<END>"
        return None

    with ScriptedEndpoint(responder=copying) as endpoint:
        result, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path, epochs=1)))
        rewrites = endpoint.requests(kind="meta", stage="rewrite")
    assert [(e.temperature, e.n) for e in rewrites] == [(0.7, 4)] + [(1.0, 1)] * 4
    new = [c for c in result.history if c.stage == "rewrite"]
    assert len(new) == 4 and all("Weigh the overall sentiment" in c.prompt for c in new)
    assert len({c.prompt for c in new}) == 4
    assert result.rounds[0].diagnosis.copies["rewrite"] == 0
    assert result.usage_by_stage["rewrite_copy_retry"].calls == 4  # the cost of the retries is visible


def test_a_copy_that_stays_a_copy_is_counted(reviews_dir, tmp_path):
    def stubborn(request, kind, stage):
        if kind == "meta" and stage in ("distill", "compress"):
            content = request["messages"][0]["content"]
            return "<START>" + content.split("Instruction:\n", 1)[1].split("\n\n")[0] + "<END>"
        return None

    with ScriptedEndpoint(responder=stubborn) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path, epochs=1, copy_retry_temperature=1.2)
        result, _ = asyncio.run(runner.optimize(settings))
        retries = [e for e in endpoint.requests(kind="meta") if e.temperature == 1.2]
    copies = result.rounds[0].diagnosis.copies
    assert copies["distill"] == 4 and copies["compress"] == 4 and copies["rewrite"] == 0
    assert len(retries) == 8  # each copy asked once more, no more


def test_the_summary_and_mlflow_say_why_nothing_was_learned(reviews_dir, tmp_path, mlflow_server):
    import mlflow

    with ScriptedEndpoint(responder=one_label) as endpoint:
        done = run_cli(
            "optimize", "--base-url", endpoint.base_url, "--model", "test-model", "--dataset", str(reviews_dir),
            "--train-size", "12", "--test-size", "10", "--epochs", "4", "--executor", "local", "--no-cache",
            "--output", str(tmp_path / "out"), "--tracking-uri", mlflow_server["uri"], "--experiment", "flat",
            "--prompt-name", "flat-prompt",
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shows no signal" in done.stderr  # the round's summary line
    assert "round 2 done" in done.stderr and "round 3" not in done.stderr
    assert "answers 'negative' 12/12 (gold " in done.stderr
    assert "stopped by: flat_signal" in done.stdout and "answered 'negative' to 12 of 12 inputs" in done.stdout
    mlflow.set_tracking_uri(mlflow_server["uri"])
    (run,) = mlflow.search_runs(experiment_names=["flat"], output_format="list")
    assert run.data.tags["distillprompt.stop_reason"] == "flat_signal"
    assert "12 of 12 inputs" in run.data.tags["distillprompt.diagnosis"]
    assert "**No signal**" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["flat_round"] == 1.0 and run.data.metrics["top_answer_share"] == 1.0
    assert "distillprompt.prompt_uri" not in run.data.tags  # nothing new to register
    assert not mlflow.MlflowClient().search_registered_models(filter_string="name = 'flat-prompt'")


def test_the_compare_table_counts_runs_without_signal():
    from mlflow_project.compare import ComparedRun, comparison_tables

    why = "Round 2 shows no signal: under every one of its 9 candidates the target answered 'negative' to 12 of 12 inputs"
    outcomes = [
        ComparedRun("distillprompt", seed, f"r{seed}", 0.5, 100, 1000, 100, 1.0, [1.0, 0.0], "macro-F1", why if seed else None)
        for seed in (0, 1)
    ] + [ComparedRun("initial", seed, f"i{seed}", 0.5, 10, 100, 10, 0.1, [1.0, 0.0], "macro-F1") for seed in (0, 1)]
    rows, table, _ = comparison_tables(outcomes, ["distillprompt", "initial"])
    assert "runs without signal" in table.splitlines()[0]
    assert [row["no_signal_runs"] for row in rows] == [1, 0]
    assert table.splitlines()[2].endswith("| 1 |") and table.splitlines()[3].endswith("| — |")
