"""The baselines in the same harness: GrIPS edits and patience, few-shot examples, the
initial prompt, and `compare` under one parent MLflow run."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from contextlib import AsyncExitStack

import pytest

from distillprompt import runner
from distillprompt.baselines import Edit, Grips, chunks, join, plan_edits
from distillprompt.llm import UsageMeter
from distillprompt.optimizer import Optimizer, Round
from distillprompt.context import open_context
from distillprompt.executors import LocalExecutor
from distillprompt.settings import load_settings
from tests.conftest import run_cli
from tests.endpoint import ScriptedEndpoint, fraction, true_label

BASE = "Read the review carefully, decide how the writer feels, and answer with one label."


def settings_for(endpoint, dataset, tmp_path, **optimizer):
    return load_settings(
        {
            "llm": {"base_url": endpoint.base_url, "model": "test-model"},
            "data": {"dataset": str(dataset), "train_size": 12, "test_size": 10},
            "optimizer": optimizer,
            "cache": {"path": str(tmp_path / "cache.sqlite")},
            "output": str(tmp_path / "out"),
            "executor": "local",
        }
    )


def test_chunks_are_phrases_or_words():
    assert chunks(BASE) == ["Read the review carefully,", "decide how the writer feels,", "and answer with one label."]
    assert chunks("Classify the sentiment.") == ["Classify", "the", "sentiment."]
    assert join(["Read it", ",", "then answer ."]) == "Read it, then answer."


def test_edit_plans_respect_what_is_possible():
    rng = random.Random(0)
    for _ in range(200):
        plan = plan_edits(2, 3, 0, rng)
        assert all(edit.operation != "add" for edit in plan[:1])  # nothing deleted yet: no add first
        size = 3
        for edit in plan:
            assert 0 <= edit.index <= size
            size += {"delete": -1, "add": 1}.get(edit.operation, 0)
    assert {e.operation for _ in range(200) for e in plan_edits(2, 4, 2, rng)} == {"delete", "swap", "paraphrase", "add"}


def test_each_grips_edit_does_what_it_claims(endpoint, reviews_dir, tmp_path):
    settings = settings_for(endpoint, reviews_dir, tmp_path, method="grips")

    async def apply(plan, pool):
        async with AsyncExitStack() as stack:
            context = await open_context(settings, stack)
            loop = Optimizer(context.task, context.meta_llm, LocalExecutor().evaluator(context), settings.optimizer,
                             seed=0, meter=UsageMeter(), method=Grips())
            return await Grips().apply(Round(1, random.Random(0), loop.state, loop.parts), BASE, plan, pool, "t")

    first, second, third = chunks(BASE)
    text, notes, removed, added = asyncio.run(apply([Edit("delete", 1)], []))
    assert text == join([first, third]) and removed == [second] and notes == [f"delete {second!r}"] and added == []
    text, notes, _, _ = asyncio.run(apply([Edit("swap", 0, 2)], []))
    assert text == join([third, second, first])
    text, notes, _, added = asyncio.run(apply([Edit("add", 3, 0)], ["Be brief."]))
    assert text == join([first, second, third, "Be brief."]) and notes == ["add 'Be brief.'"] and added == ["Be brief."]
    text, notes, _, _ = asyncio.run(apply([Edit("paraphrase", 0)], []))
    rewritten = chunks(text)[0]
    assert rewritten != first and text.endswith(join([second, third]))
    assert notes == [f"paraphrase {first!r} -> {rewritten!r}"]
    meta = endpoint.requests(kind="meta")
    assert [e.stage for e in meta] == ["grips_paraphrase"] and first in meta[0].content
    # composed edits: a chunk deleted by this candidate is not in the pool, so it cannot come back
    plans = [plan_edits(2, 3, 0, random.Random(seed)) for seed in range(300)]
    assert not any(p[0].operation == "delete" and p[1].operation == "add" for p in plans)


def test_grips_defaults_are_the_reference_codes():
    from distillprompt.settings import OptimizerSettings

    defaults = OptimizerSettings()
    assert (defaults.grips_candidates, defaults.grips_edits, defaults.grips_iterations, defaults.grips_patience) == (5, 1, 10, 2)


def test_the_deleted_pool_follows_only_accepted_candidates(reviews_dir, tmp_path):
    """Against a target that rewards short prompts, the search accepts deletions; the pool
    must hold exactly the deletions of the accepted chain minus what it added back, and an
    add never inserts a chunk its base still contains."""
    from distillprompt.baselines import DELETED

    def short_is_better(request, kind, stage):
        if kind != "scoring":
            return None
        content = request["messages"][0]["content"]
        instruction, review = content.split("\n\nPossible answers")[0], content.split("Answer with")[0]
        right = true_label(review.split("Possible answers")[1], ["negative", "positive"])
        wrong = "negative" if right == "positive" else "positive"
        # the shorter the instruction, the more reviews it gets right
        return f"<ans>{right if fraction('short', instruction, review) < 1.6 - len(instruction) / 100 else wrong}</ans>"

    with ScriptedEndpoint(responder=short_is_better) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path, method="grips", initial_prompt=BASE + " Think about it, then say it.",
                                grips_iterations=10, grips_patience=0, stop_when_flat=False)
        result, folder = asyncio.run(runner.optimize(settings))
    history = {c.id: c for c in result.history}
    chain = []
    for summary in result.rounds:  # the accepted candidates, in order
        if summary.improved:
            chain.append(history[summary.best_id])
    assert chain, "the short-prompt target should accept at least one deletion"
    expected: list[str] = []
    for candidate in chain:
        for note in candidate.note.split("; "):
            if note.startswith("add "):
                expected.remove(note[len("add "):].strip("'\""))
        expected += [note[len("delete "):].strip("'\"") for note in candidate.note.split("; ") if note.startswith("delete ")]
    state = json.loads((folder / "state.json").read_text())
    assert state["method_state"][DELETED] == expected  # rejected candidates' deletions never entered
    assert any("add " in (c.note or "") for c in result.history)  # adds were drawn from that pool
    for candidate in (c for c in result.history if c.stage == "grips"):
        base = history[candidate.parents[0]]
        for note in candidate.note.split("; "):
            if note.startswith("add "):
                assert note[len("add "):].strip("'\"") not in chunks(base.prompt)


def test_grips_search_scores_five_candidates_an_iteration_and_stops_on_patience(reviews_dir, tmp_path):
    def flat(request, kind, stage):
        return "<ans>positive</ans>" if kind == "scoring" else None

    with ScriptedEndpoint(responder=flat) as endpoint:
        result, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path, method="grips",
                                                             initial_prompt=BASE)))
    assert result.stop_reason == "patience" and len(result.rounds) == 2  # grips_patience 2, of 10 iterations
    per_round = Counter(c.round for c in result.history if c.stage == "grips")
    assert per_round == {1: 5, 2: 5}
    assert all(c.note and c.parents == [0] for c in result.history if c.stage == "grips")
    assert result.final.id == 0


def test_fewshot_examples_come_from_the_train_sample_only(endpoint, reviews_dir, tmp_path):
    from distillprompt.data import load_task

    settings = settings_for(endpoint, reviews_dir, tmp_path, method="fewshot", fewshot_examples=4)
    result, _ = asyncio.run(runner.optimize(settings))
    (shot,) = [c for c in result.history if c.stage == "fewshot"]
    assert shot.prompt.startswith(result.initial_prompt)
    assert result.final.id == shot.id  # the few-shot prompt is the result, not a contender
    shown = [line.removeprefix("Input: ") for line in shot.prompt.splitlines() if line.startswith("Input: ")]
    task = load_task(settings.data, settings.seed)  # the same seeded samples the run drew
    train = {e.inputs["text"]: e.target for e in task.train}
    assert len(shown) == 4 and all(text in train for text in shown)
    assert not set(shown) & {e.inputs["text"] for e in task.test}
    for text in shown:  # each example carries its own train label
        assert f"Input: {text}\nAnswer: <ans>{train[text]}</ans>" in shot.prompt
    assert not endpoint.requests(kind="meta")  # few-shot needs no optimizer model


def test_initial_method_only_scores_the_initial_prompt(endpoint, reviews_dir, tmp_path):
    result, _ = asyncio.run(runner.optimize(settings_for(endpoint, reviews_dir, tmp_path, method="initial")))
    assert result.final.id == 0 and len(result.history) == 1 and result.rounds == []
    assert not endpoint.requests(kind="meta")
    assert len(endpoint.requests(kind="scoring")) == 12 + 10


def test_compare_records_children_per_method_and_seed_and_reruns_for_free(mlflow_server, endpoint, reviews_dir, tmp_path):
    import mlflow

    args = [
        "compare", "--methods", "distillprompt,grips,initial", "--seeds", "2", "--dataset", str(reviews_dir),
        "--base-url", endpoint.base_url, "--model", "test-model", "--executor", "local", "--epochs", "1",
        "--train-size", "12", "--test-size", "10", "--grips-iterations", "2", "--experiment", "compare",
        "--cache-path", str(tmp_path / "cache.sqlite"), "--quiet",
    ]
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    first = run_cli(*args, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    sent = len(endpoint.requests())
    second = run_cli(*args, env=env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(endpoint.requests()) == sent  # the rerun costs no LLM request

    def table(output: str) -> str:
        return output[output.index("| method | runs"): output.index("| method | wall time")]

    assert table(first.stdout) == table(second.stdout)
    assert "DistillPrompt − method" in first.stdout and "| grips | 2 |" in first.stdout
    assert "| test macro-F1 (mean ± std) | scoring requests | meta requests | tokens |" in first.stdout

    mlflow.set_tracking_uri(mlflow_server["uri"])
    parent_id = first.stdout.strip().splitlines()[-1].split()[-1]
    children = mlflow.search_runs(experiment_names=["compare"], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  output_format="list")
    assert Counter(r.data.tags["distillprompt.method"] for r in children) == {"distillprompt": 2, "grips": 2, "initial": 2}
    assert {r.data.params["seed"] for r in children} == {"0", "1"}
    assert all("final_test_score" in r.data.metrics for r in children)
    parent = mlflow.get_run(parent_id)
    assert "comparison/table.json" in parent.data.tags["mlflow.loggedArtifacts"]
    assert parent.data.tags["distillprompt.method"] == "compare"


@pytest.mark.parametrize("val_size", [0, 6])
def test_budget_match_gives_grips_distillprompts_scoring_requests(mlflow_server, endpoint, reviews_dir, tmp_path, val_size):
    """With a validation sample, its scoring counts in the budget too (a candidate then
    costs its train and its validation scorings)."""
    import mlflow

    args = [
        "compare", "--methods", "grips,distillprompt,initial", "--seeds", "1", "--budget-match", "--dataset",
        str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model", "--executor", "local",
        "--epochs", "1", "--train-size", "12", "--test-size", "10", "--experiment", f"budget{val_size}",
        "--cache-path", str(tmp_path / "cache.sqlite"), "--quiet", *(["--val-size", str(val_size)] if val_size else []),
    ]
    completed = run_cli(*args, env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]}, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server["uri"])
    parent_id = completed.stdout.strip().splitlines()[-1].split()[-1]
    runs = {o["method"]: o for o in mlflow.artifacts.load_dict(f"runs:/{parent_id}/comparison/runs.json")}
    reference, grips = runs["distillprompt"]["scoring_calls"], runs["grips"]["scoring_calls"]
    # equal within one candidate's worth (12 train examples, and its validation examples), never above
    assert reference - 12 - val_size < grips <= reference, (reference, grips)
    # the initial prompt is scored on train only: with one candidate there is nothing to select
    assert runs["initial"]["scoring_calls"] == 12 and runs["grips"]["meta_calls"] >= 0
    assert mlflow.get_run(parent_id).data.params["budget_match"] == "True"
    # the reference must be among the methods
    refused = run_cli(*[a if a != "grips,distillprompt,initial" else "grips,initial" for a in args],
                      env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]})
    assert refused.returncode == 2 and "add distillprompt to --methods" in refused.stderr


@pytest.mark.parametrize("methods", ["distillprompt,bogus", ""])
def test_compare_refuses_unknown_methods(methods):
    completed = run_cli("compare", "--methods", methods, "--dataset", "x.jsonl")
    assert completed.returncode == 2 and "--methods" in completed.stderr


def test_mlflow_run_compare_nests_children_under_its_own_run(mlflow_server, endpoint, reviews_dir, tmp_path):
    """Inside `mlflow run`, MLFLOW_RUN_ID names the parent: children must still get runs of their own."""
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    from tests.conftest import ROOT, venv_env

    completed = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "compare", "--env-manager", "local",
         "--experiment-name", "compare-project", "-P", "methods=initial,fewshot", "-P", "seeds=1",
         "-P", f"dataset={reviews_dir}", "-P", f"base_url={endpoint.base_url}", "-P", "model=test-model",
         "-P", "train_size=12", "-P", "test_size=10"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=venv_env({"MLFLOW_TRACKING_URI": mlflow_server["uri"], "DISTILLPROMPT_CACHE__PATH": str(tmp_path / "c.sqlite")}),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server["uri"])
    runs = mlflow.search_runs(experiment_names=["compare-project"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["fewshot-seed0", "initial-seed0"]
    assert "comparison/table.md" in parent.data.tags["mlflow.loggedArtifacts"] or mlflow.artifacts.load_text(
        parent.info.artifact_uri + "/comparison/table.md"
    )


def test_a_registered_baseline_prompt_names_its_method(mlflow_server, endpoint, reviews_dir, tmp_path):
    import mlflow

    completed = run_cli(
        "optimize", "--method", "grips", "--grips-iterations", "2", "--dataset", str(reviews_dir),
        "--base-url", endpoint.base_url, "--model", "test-model", "--executor", "local", "--train-size", "12",
        "--test-size", "10", "--cache-path", str(tmp_path / "cache.sqlite"), "--experiment", "grips-registered",
        "--prompt-name", "grips-registered", "--output", str(tmp_path / "out"),
        env={"MLFLOW_TRACKING_URI": mlflow_server["uri"]},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "round 1/2 grips" in completed.stderr  # the progress display counts the method's own iterations
    mlflow.set_tracking_uri(mlflow_server["uri"])
    prompt = mlflow.genai.load_prompt("prompts:/grips-registered@candidate")
    assert prompt.tags["method"] == "grips"
    (run,) = mlflow.search_runs(experiment_names=["grips-registered"], output_format="list")
    assert run.data.tags["distillprompt.method"] == "grips" and prompt.tags["run_id"] == run.info.run_id
