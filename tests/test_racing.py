"""Racing (``--scoring race``): candidates scored block by block against the best prompt so
far, through the runner, against a scripted endpoint whose candidates are known to be bad,
good or middling."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from distillprompt import runner
from distillprompt.progress import ConsoleProgress
from distillprompt.engine.racing import is_worse
from distillprompt.settings import load_settings
from tests.conftest import ROOT, review_rows, run_cli, venv_env, write_jsonl
from tests.endpoint import ScriptedEndpoint, fraction, scoring_parts, true_label

TERRIBLE = "Terrible guess: pick any label at random."
EXCELLENT = "Excellent: weigh the sentiment words of the text."
PLAIN = ["Plain: read the text and pick a label.", "Plain too: read it and answer."]
REWRITES = [TERRIBLE, EXCELLENT, *PLAIN]
TRAIN, BLOCK, TEST = 40, 10, 10


def target(request, kind, stage):
    """Rewrites: one terrible candidate, one excellent, two as good as the initial prompt;
    the other stages build on them as the scripted writer does (their texts keep the word
    that decides their quality)."""
    if kind == "meta" and stage == "rewrite":
        return f"<START>{REWRITES[request['_sample'] % len(REWRITES)]}<END>"
    if kind != "scoring":
        return None
    content = "\n".join(str(m.get("content", "")) for m in request["messages"])
    instruction, labels, text = scoring_parts(content)
    truth = true_label(text, labels)
    if "Terrible" in instruction:
        right = fraction("terrible", text) < 0.1
    elif "Excellent" in instruction:
        right = True
    else:  # the initial prompt and the plain ones: right 7 times in 10
        right = fraction("plain", instruction, text) < 0.7
    wrong = next(label for label in labels if label != truth)
    return f"<ans>{truth if right else wrong}</ans>"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    folder = tmp_path_factory.mktemp("race-reviews")
    write_jsonl(folder / "train.jsonl", review_rows(TRAIN, seed=11))
    write_jsonl(folder / "test.jsonl", review_rows(TEST, seed=12))
    return folder


def settings_for(endpoint, dataset, tmp_path, **optimizer):
    return load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01},
        "data": {"dataset": str(dataset), "train_size": TRAIN, "test_size": TEST},
        "optimizer": {"epochs": 1, "scoring": "race", "race_block": BLOCK, "race_alpha": 0.05, **optimizer},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })


def optimize(endpoint, dataset, tmp_path, progress=None, **optimizer):
    return asyncio.run(runner.optimize(settings_for(endpoint, dataset, tmp_path, **optimizer), progress=progress))


def scored_inputs(endpoint) -> dict[str, list[str]]:
    """Each instruction's scored inputs, in the order the endpoint answered them."""
    seen: dict[str, list[str]] = defaultdict(list)
    for entry in endpoint.requests(kind="scoring"):
        instruction, _, text = scoring_parts(entry.content)
        seen[instruction].append(text)
    return seen


def test_a_bad_candidate_stops_after_one_block_and_a_good_one_is_scored_in_full_and_wins(reviews, tmp_path):
    lines = io.StringIO()
    with ScriptedEndpoint(responder=target) as endpoint:
        result, folder = optimize(endpoint, reviews, tmp_path, progress=ConsoleProgress(lines))
        seen = scored_inputs(endpoint)
    terrible, excellent = result.history[1], result.history[2]
    assert (terrible.prompt, excellent.prompt) == (TERRIBLE, EXCELLENT)
    # mostly wrong: stopped after its first block, with the score of those 10 examples
    assert terrible.eliminated_by == 0 and terrible.examples_scored == BLOCK
    assert len(seen[TERRIBLE]) == BLOCK and terrible.score is not None and terrible.score < 0.5
    # better than the incumbent: scored on every train example, and selected (then scored on test)
    assert excellent.eliminated_by is None and excellent.examples_scored == TRAIN
    assert len(seen[EXCELLENT]) == TRAIN + TEST
    assert result.final.id == excellent.id and result.final.score == 1.0
    # the incumbent is never scored again: its train sample once, its test sample once
    assert len(seen[result.initial.prompt]) == TRAIN + TEST
    # what was paid is reported: in the round's record, the run's and the history
    saved = json.loads((folder / "result.json").read_text())
    (round_one,) = saved["rounds"]
    stopped = [c for c in saved["history"] if c["eliminated_by"] is not None and c["duplicate_of"] is None]
    assert round_one["race"]["stopped"] == len(stopped) >= 1 and BLOCK in round_one["race"]["stopped_after"]
    distinct = [c for c in saved["history"][1:] if c["duplicate_of"] is None]
    assert all(len(seen[c["prompt"]]) == c["examples_scored"] for c in distinct if c["id"] != excellent.id)
    paid = sum(c["examples_scored"] for c in distinct)
    assert round_one["race"]["requests"] == paid < round_one["race"]["full_requests"] == len(distinct) * TRAIN
    assert saved["race"]["scoring"] == "race"
    assert saved["race"]["saved_fraction"] == pytest.approx(1 - paid / (len(distinct) * TRAIN), abs=1e-4)
    # and in the round's summary line
    (summary,) = [line for line in lines.getvalue().splitlines() if line.startswith("round 1 done")]
    assert f"{len(stopped)} of {len(distinct)} stopped after" in summary and f"scoring {paid}/{len(distinct) * TRAIN}" in summary


def test_a_candidate_far_behind_the_leader_of_its_batch_stops_though_it_matches_the_incumbent(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        result, folder = optimize(endpoint, reviews, tmp_path)
        seen = scored_inputs(endpoint)
    excellent = next(c for c in result.history if c.prompt == EXCELLENT)
    # the plain rewrites answer as well as the initial prompt (7 in 10) and race beside the
    # excellent one (10 in 10): the leader's lead stops them, and they name it
    plain = [c for c in result.history if c.prompt in PLAIN and c.duplicate_of is None]
    assert plain and all(c.eliminated_by == excellent.id for c in plain)
    assert all(c.examples_scored < TRAIN and len(seen[c.prompt]) == c.examples_scored for c in plain)
    assert all(not c.selectable for c in plain) and result.final.id == excellent.id
    saved = {c["id"]: c for c in json.loads((folder / "result.json").read_text())["history"]}
    assert all(saved[c.id]["eliminated_by"] == excellent.id for c in plain)


def test_every_candidate_meets_the_blocks_in_the_same_order(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        result, _ = optimize(endpoint, reviews, tmp_path)
        seen = scored_inputs(endpoint)
    # a block goes out only once the one before it is answered: an instruction's inputs,
    # cut every BLOCK, are its blocks
    blocks_of = {
        c.prompt: [set(seen[c.prompt][i:i + BLOCK]) for i in range(0, c.examples_scored, BLOCK)]
        for c in result.history[1:] if c.duplicate_of is None
    }
    full = blocks_of[EXCELLENT]
    assert len(full) == TRAIN // BLOCK and set().union(*full) == {row["text"] for row in review_rows(TRAIN, seed=11)}
    assert any(len(blocks) < len(full) for blocks in blocks_of.values())  # some stopped early
    for prompt, blocks in blocks_of.items():
        assert blocks == full[: len(blocks)], prompt


def test_full_scoring_scores_every_candidate_on_every_example(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        result, _ = optimize(endpoint, reviews, tmp_path, scoring="full")
        seen = scored_inputs(endpoint)
    distinct = [c for c in result.history[1:] if c.duplicate_of is None]
    assert all(c.examples_scored == TRAIN and c.eliminated_by is None for c in distinct)
    assert all(len(seen[c.prompt]) == TRAIN + (TEST if c.id == result.final.id else 0) for c in distinct)
    assert result.race == {"scoring": "full", "candidates": len(distinct), "stopped": 0, "stopped_after": [],
                           "requests": len(distinct) * TRAIN, "full_requests": len(distinct) * TRAIN,
                           "saved_fraction": 0.0}


def test_a_rerun_from_the_cache_sends_nothing_and_races_alike(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        first, _ = optimize(endpoint, reviews, tmp_path, epochs=2)
        sent = len(endpoint.requests())
        second, _ = optimize(endpoint, reviews, tmp_path, epochs=2)
        assert len(endpoint.requests()) == sent
    assert second.usage.requests == 0
    assert [c.to_dict() for c in second.history] == [c.to_dict() for c in first.history]
    assert any(c.eliminated_by is not None for c in first.history)


def test_the_paired_test_stops_only_what_is_worse():
    right, wrong = [1.0] * 10, [0.0] * 10  # per-example values: the metric is their mean
    assert is_worse(wrong, right, None, None, 0.05)  # worse on every example
    assert not is_worse(right, wrong, None, None, 0.05)  # better
    assert not is_worse(right, right, None, None, 0.05)  # the same answers: no evidence
    one_miss = [0.0] + [1.0] * 9
    assert not is_worse(one_miss, right, None, None, 0.05)  # one example of ten is no evidence at 5%
    mixed = [1.0, 0.0] * 5  # as often right, on other examples
    assert not is_worse(mixed, [0.0, 1.0] * 5, None, None, 0.05)


def test_the_race_tests_macro_f1_not_accuracy():
    """75 examples of label 0, 25 of label 1. The incumbent leans: it answers 0 to every one
    (accuracy 0.75, macro-F1 0.43). A candidate that fixes the lean finds every 1 but calls
    40 of the 0s a 1 (accuracy 0.60, macro-F1 0.60). Selection reads macro-F1, so the race
    must not stop the candidate, though a test of accuracy would; and the lean is what it
    finds worse."""
    targets = [0.0] * 75 + [1.0] * 25
    leaning = [0.0] * 100
    fixed = [0.0] * 35 + [1.0] * 40 + [1.0] * 25
    assert not is_worse(fixed, leaning, targets, 2, 0.1)
    assert is_worse(leaning, fixed, targets, 2, 0.1)
    correct = lambda record: [float(p == t) for p, t in zip(record, targets)]  # noqa: E731
    assert is_worse(correct(fixed), correct(leaning), None, None, 0.1)  # what accuracy would have said


@pytest.fixture()
def slow_target():
    with ScriptedEndpoint(responder=target, latency=0.02) as server:
        yield server


def race_args(endpoint, reviews, tmp_path, output: str, cache: str, *extra: str) -> list[str]:
    return ["optimize", "--dataset", str(reviews), "--base-url", endpoint.base_url, "--model", "test-model",
            "--train-size", str(TRAIN), "--test-size", str(TEST), "--epochs", "2", "--scoring", "race",
            "--race-block", str(BLOCK), "--race-alpha", "0.05", "--executor", "local", "--no-register",
            "--cache-path", str(tmp_path / cache), "--output", str(tmp_path / output), *extra]


def straight_then_killed(endpoint, args_for, tmp_path, env=None) -> dict:
    """The run straight through (its result), then again with a cache of its own, killed half-way
    through round 2's train scoring (the initial prompt's train and test scoring and round 1's
    come first); the killed run's output folder is ``killed``."""
    straight = run_cli(*args_for("straight", "straight.sqlite"), env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = json.loads((tmp_path / "straight" / "result.json").read_text())
    round_one, round_two = (r["race"]["requests"] for r in expected["rounds"])
    assert expected["rounds"][1]["race"]["stopped"] >= 1  # round 2 races too
    kill_at = TRAIN + TEST + round_one + round_two // 2
    endpoint.reset()
    process = subprocess.Popen([sys.executable, "-m", "distillprompt", *args_for("killed", "cache.sqlite")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=venv_env(env), cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(endpoint.requests(kind="scoring")) < kill_at:
        time.sleep(0.002)
    process.kill()
    process.wait(30)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["round"] == 1  # round 2 had not finished
    return expected


def test_a_run_killed_mid_race_resumes_to_the_same_result(mlflow_server, slow_target, reviews, tmp_path):
    import mlflow

    endpoint = slow_target
    mlflow.set_tracking_uri(mlflow_server["uri"])
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    experiments = {"straight.sqlite": "race-straight", "cache.sqlite": "race-resume"}

    def args_for(output: str, cache: str) -> list[str]:
        return race_args(endpoint, reviews, tmp_path, output, cache, "--experiment", experiments[cache])

    expected = straight_then_killed(endpoint, args_for, tmp_path, env)
    (run,) = mlflow.search_runs(experiment_names=["race-resume"], output_format="list")

    resumed = run_cli("optimize", "--resume", run.info.run_id, "--output", str(tmp_path / "resumed"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert got["final_prompt"] == expected["final_prompt"]
    assert got["history"] == expected["history"]
    # the resumed run ran round 2 (and round 1 again, from the cache, when the tracker's queue
    # had not yet recorded round 1's checkpoint when the run was killed)
    assert [r["race"] for r in got["rounds"]][-1] == expected["rounds"][1]["race"]


def test_an_untracked_run_killed_mid_race_resumes_from_its_output_folder(slow_target, reviews, tmp_path):
    """No MLflow: ``--resume FOLDER`` reads the settings and the checkpoint the run left in its
    output folder, runs round 2 only, and finishes in that folder as the straight run did."""
    endpoint = slow_target
    def args_for(output: str, cache: str) -> list[str]:
        return race_args(endpoint, reviews, tmp_path, output, cache)

    expected = straight_then_killed(endpoint, args_for, tmp_path)
    killed = tmp_path / "killed"
    assert json.loads((killed / "settings_tree.json").read_text())["optimizer"]["race_block"] == BLOCK
    endpoint.reset()

    changed = run_cli("optimize", "--resume", str(killed), "--seed", "9")
    assert changed.returncode == 2 and "--seed 9 (the run has 0)" in changed.stderr, changed.stderr[-2000:]
    resumed = run_cli("optimize", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((killed / "result.json").read_text())
    assert got["final_prompt"] == expected["final_prompt"]
    assert got["history"] == expected["history"]
    assert [r["round"] for r in got["rounds"]] == [2]  # round 1 came from the checkpoint
    assert got["rounds"][0]["race"] == expected["rounds"][1]["race"]
    assert got["settings"]["resume"] is None  # nothing to take up in MLflow: a folder's run is untracked
