"""The DistillPrompt loop end to end through the runner, against the scripted endpoint."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from distillprompt import runner
from distillprompt.settings import load_settings
from distillprompt.state import STAGES
from tests.endpoint import ScriptedEndpoint


def optimize(endpoint: ScriptedEndpoint, dataset, tmp_path, callbacks=None, **optimizer):
    seed = optimizer.pop("seed", 0)
    data = {"dataset": str(dataset), "train_size": optimizer.pop("train_size", 12), "test_size": optimizer.pop("test_size", 10)}
    settings = load_settings(
        {
            "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01, **optimizer.pop("llm", {})},
            "data": data,
            "optimizer": {"epochs": optimizer.pop("epochs", 1), **optimizer},
            "cache": {"path": str(tmp_path / "cache.sqlite"), "enabled": optimizer.pop("cache", True)},
            "seed": seed,
            "output": str(tmp_path / "out"),
            "executor": "local",
        }
    )
    return asyncio.run(runner.optimize(settings, callbacks=callbacks))


def meta_requests(endpoint: ScriptedEndpoint) -> Counter:
    return Counter(entry.stage for entry in endpoint.requests(kind="meta"))


def test_one_round_runs_every_stage_with_its_lineage(endpoint, reviews_dir, tmp_path):
    # the method's own requests: replies that copy their parent are not asked again here
    # (copy retries: test_diagnosis)
    result, folder = optimize(endpoint, reviews_dir, tmp_path, copy_retries=0)
    history = result.history
    by_stage = {stage: [c for c in history if c.stage == stage] for stage in ("initial", *STAGES)}
    assert [len(by_stage[s]) for s in ("initial", *STAGES)] == [1, 2, 4, 4, 4, 1, 3]
    ids = {stage: {c.id for c in cands} for stage, cands in by_stage.items()}
    # the demos candidates: the initial instruction with solved examples; the rewrites of it
    assert all(c.parents == [0] and c.bare_instruction == history[0].prompt and c.demos for c in by_stage["demos"])
    assert all(c.parents == [0] for c in by_stage["rewrite"])
    assert [c.parents for c in by_stage["distill"]] == [[i] for i in sorted(ids["rewrite"])]
    assert [c.parents for c in by_stage["compress"]] == [[i] for i in sorted(ids["distill"])]
    originals = {c.id if c.duplicate_of is None else c.duplicate_of for c in by_stage["compress"]}
    assert set(by_stage["aggregate"][0].parents) == originals  # each distinct compressed prompt once
    assert all(c.parents == [by_stage["aggregate"][0].id] for c in by_stage["paraphrase"])
    assert all(c.score is not None and c.round == 1 for c in history[1:])
    # 11 meta-requests per round when the endpoint honours n: 1 + 4 + 4 + 1 + 1
    assert meta_requests(endpoint) == {"rewrite": 1, "distill": 4, "compress": 4, "aggregate": 1, "paraphrase": 1}
    assert [e.n for e in endpoint.requests(kind="meta", stage="rewrite")] == [4]
    assert [e.n for e in endpoint.requests(kind="meta", stage="paraphrase")] == [3]
    saved = json.loads((folder / "result.json").read_text())
    assert {"initial_prompt", "final_prompt", "initial_scores", "final_scores", "history", "usage"} <= set(saved)
    assert saved["final_prompt"] == result.final_prompt


def test_stage_temperatures_and_max_tokens_reach_the_endpoint(endpoint, reviews_dir, tmp_path):
    optimize(endpoint, reviews_dir, tmp_path, temperature_rewrite=0.9, temperature_compress=0.1, copy_retries=0)
    temperatures = {e.stage: e.temperature for e in endpoint.requests(kind="meta")}
    assert temperatures == {"rewrite": 0.9, "distill": 0.5, "compress": 0.1, "aggregate": 0.4, "paraphrase": 0.7}
    scoring = endpoint.requests(kind="scoring")
    # on an endpoint the answer budget leaves room for a short reasoning (the embedded model's
    # tight budget is checked in test_embedded)
    assert {e.max_tokens for e in scoring} == {256}
    assert {e.temperature for e in scoring} == {0.0}


def test_without_native_n_each_sample_is_its_own_request(reviews_dir, tmp_path):
    with ScriptedEndpoint(support_n=False) as plain:
        result, _ = optimize(plain, reviews_dir, tmp_path, copy_retries=0)
    counts = meta_requests(plain)
    # the first rewrite call tries n=4 and learns the endpoint ignores it; 16 calls in all
    assert counts == {"rewrite": 4, "distill": 4, "compress": 4, "aggregate": 1, "paraphrase": 3}
    assert len([c for c in result.history if c.stage == "paraphrase"]) == 3


def test_distinct_prompts_are_scored_once(endpoint, reviews_dir, tmp_path):
    result, _ = optimize(endpoint, reviews_dir, tmp_path, train_size=12, test_size=10, epochs=2)
    distinct = [c for c in result.history if c.duplicate_of is None]
    duplicates = [c for c in result.history if c.duplicate_of is not None]
    assert duplicates, "the scripted endpoint repeats prompts; this test needs some"
    train_requests = len(endpoint.requests(kind="scoring")) - 10 * (1 if result.final.id == 0 else 2)
    # each distinct prompt once: on every train example, or until a race stopped it
    assert train_requests == sum(c.examples_scored for c in distinct)
    for duplicate in duplicates:
        original = result.history[duplicate.duplicate_of]
        assert original.id < duplicate.id and original.prompt.split() == duplicate.prompt.split()
        assert duplicate.score == original.score


def test_best_is_the_highest_train_score_and_ties_keep_the_older(reviews_dir, tmp_path):
    def responder(request, kind, stage):
        if kind == "scoring":
            return "<ans>positive</ans>"  # every prompt scores the same
        return None

    with ScriptedEndpoint(responder=responder) as flat:
        result, _ = optimize(flat, reviews_dir, tmp_path, epochs=2)
    scores = {c.score for c in result.history}
    assert len(scores) == 1
    assert result.final.id == 0 and result.final_prompt == result.initial_prompt
    # two rounds in which every candidate ties show no signal: said, and the run stops there
    assert result.stop_reason == "flat_signal" and "shows no signal" in result.diagnosis


def test_selection_takes_the_best_scoring_candidate(endpoint, reviews_dir, tmp_path):
    result, _ = optimize(endpoint, reviews_dir, tmp_path, epochs=2)
    best = max(c.score for c in result.history)
    first_best = min(c.id for c in result.history if c.score == best)
    assert result.final.id == first_best
    assert result.final_scores["train"]["score"] == best
    assert best > result.initial_scores["train"]["score"]


def test_same_seed_same_run_other_seed_other_examples(reviews_dir, tmp_path):
    runs = []
    for seed, folder in ((5, "a"), (5, "b"), (6, "c")):
        with ScriptedEndpoint() as fresh:
            result, _ = optimize(fresh, reviews_dir, tmp_path / folder, seed=seed)
            shown = [e.content for e in fresh.requests(kind="meta", stage="distill")]
            runs.append(([c.prompt for c in result.history], sorted(shown), result.task["digest"]))
    assert runs[0] == runs[1]
    assert runs[0][2] != runs[2][2]  # another seed draws another train sample
    assert runs[0][1] != runs[2][1]


def test_a_rerun_is_served_from_the_cache(endpoint, reviews_dir, tmp_path):
    first, _ = optimize(endpoint, reviews_dir, tmp_path)
    sent = len(endpoint.requests())
    second, _ = optimize(endpoint, reviews_dir, tmp_path)
    assert len(endpoint.requests()) == sent
    assert second.usage.requests == 0 and second.usage.cache_hits == first.usage.calls
    assert second.final_prompt == first.final_prompt
    assert [c.to_dict() for c in second.history] == [c.to_dict() for c in first.history]


def test_call_budget_stops_after_the_stage_that_reaches_it(endpoint, reviews_dir, tmp_path):
    # initial scoring takes 12 calls and the rewrite stage 1 + 4×12 more: a budget of 20
    # is crossed inside the rewrite stage, so the run stops once that stage is scored (no
    # demos stage before it here: it would cross the budget first)
    result, _ = optimize(endpoint, reviews_dir, tmp_path, epochs=3, max_calls=20, demos=0)
    assert result.stop_reason == "budget_calls"
    assert {c.stage for c in result.history} == {"initial", "rewrite"}
    assert all(c.score is not None for c in result.history)
    assert result.final.score == max(c.score for c in result.history)
    assert meta_requests(endpoint) == {"rewrite": 1}
    assert result.final_scores["test"]["score"] is not None


def test_token_budget_stops_cleanly(endpoint, reviews_dir, tmp_path):
    result, _ = optimize(endpoint, reviews_dir, tmp_path, epochs=3, max_total_tokens=1, demos=0)
    assert result.stop_reason == "budget_tokens"
    assert meta_requests(endpoint) == {"rewrite": 1}


def test_patience_stops_a_run_that_does_not_improve(reviews_dir, tmp_path):
    def responder(request, kind, stage):
        return "<ans>positive</ans>" if kind == "scoring" else None

    with ScriptedEndpoint(responder=responder) as flat:
        result, _ = optimize(flat, reviews_dir, tmp_path, epochs=5, patience=2)
        rounds = Counter(e.stage for e in flat.requests(kind="meta"))
    assert result.stop_reason == "patience"
    assert len(result.rounds) == 2
    assert rounds["rewrite"] == 2


def test_unusable_replies_are_dropped_and_counted(reviews_dir, tmp_path):
    def responder(request, kind, stage):
        if stage == "rewrite":
            return ""  # every rewrite comes back empty
        if stage == "compress":
            return "<START>Classify the review. <START> Classify it again.<END>"  # a leftover reply tag
        if stage == "paraphrase":
            return "The instruction scored 0.500 out of 1.000."  # only an echo of the score line
        return None

    with ScriptedEndpoint(responder=responder) as weak:
        result, _ = optimize(weak, reviews_dir, tmp_path)
    assert result.rejections == {"rewrite": {"empty": 4}, "compress": {"tags": 4}, "paraphrase": {"echo": 3}}
    stages = Counter(c.stage for c in result.history)
    assert stages == {"initial": 1, "demos": 2, "distill": 4, "aggregate": 1}
    # a dropped reply passes its parent on: with no rewrite left, each distillation works
    # from the best prompt itself, and aggregation from the distilled prompts
    distilled = [c for c in result.history if c.stage == "distill"]
    assert all(c.parents == [0] for c in distilled)
    (aggregate,) = [c for c in result.history if c.stage == "aggregate"]
    assert set(aggregate.parents) == {c.duplicate_of or c.id for c in distilled}


def test_a_failing_callback_is_logged_and_the_run_finishes(endpoint, reviews_dir, tmp_path, caplog):
    from distillprompt.optimizer import Callback

    class Broken(Callback):
        def on_stage(self, event):
            raise ValueError("bad event")

        def on_round(self, result):
            raise RuntimeError("dashboard down")

        def on_llm_call(self, call):
            raise ConnectionError("tracing backend gone")

    result, folder = optimize(endpoint, reviews_dir, tmp_path, callbacks=[Broken()])
    assert result.stop_reason == "rounds" and len(result.rounds) == 1
    assert json.loads((folder / "result.json").read_text())["final_prompt"] == result.final_prompt
    assert (tmp_path / "out" / "state.json").exists()  # the checkpoint writer after it still ran
    assert "callback Broken failed in on_round (RuntimeError: dashboard down); the run goes on" in caplog.text
    assert "callback Broken failed in on_stage (ValueError: bad event)" in caplog.text
    # a per-request observer that fails costs no request: every one was answered and kept
    assert "callback Broken failed in on_llm_call (ConnectionError: tracing backend gone)" in caplog.text
    assert result.usage.failed == 0 and result.failure is None


def test_saved_state_carries_its_schema_version(tmp_path):
    import pytest

    from distillprompt.errors import UserError
    from distillprompt.state import STATE_SCHEMA_VERSION, Candidate, RunState

    state = RunState(seed=3, history=[Candidate(id=0, prompt="Classify.", stage="initial", round=0)])
    state.save(tmp_path / "state.json")
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["schema_version"] == STATE_SCHEMA_VERSION == 4
    assert RunState.load(tmp_path / "state.json").history[0].prompt == "Classify."
    # a state of version 1 (rounds called epochs, no racing) is migrated; one written before
    # the version field existed is version 1
    old = {"seed": 3, "history": [{"id": 0, "prompt": "Classify.", "stage": "initial", "epoch": 0, "score": 0.5}],
           "best_id": 0, "epoch": 2, "stale_epochs": 1, "flat_rounds": 0, "rng_state": None, "rejections": {},
           "stop_reason": None, "extras": {"grips_deleted": ["a"]}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = RunState.load(tmp_path / "old.json")
    assert (loaded.seed, loaded.round, loaded.stale_rounds, loaded.method_state) == (3, 2, 1, {"grips_deleted": ["a"]})
    assert loaded.history[0].round == 0 and loaded.history[0].examples_scored is None and loaded.best_record is None
    assert loaded.history[0].demos == [] and loaded.history[0].bare_instruction == "Classify."
    assert loaded.history[0].refused == 0 and loaded.refused == []  # an older state refused nothing
    saved["schema_version"] = STATE_SCHEMA_VERSION + 1
    (tmp_path / "new.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="upgrade distillprompt"):
        RunState.load(tmp_path / "new.json")
    # a state it cannot read is refused in one line, never read as an empty one
    for damaged in ('{"schema_version": 3, "seed": 3}', "[1, 2]", '{"seed": 3, "histo'):
        (tmp_path / "damaged.json").write_text(damaged)
        with pytest.raises(UserError, match=r"cannot be read .* \(without --resume\)"):
            RunState.load(tmp_path / "damaged.json")


def test_every_callback_hears_the_one_final_settings_and_nothing_changes_them(endpoint, reviews_dir, tmp_path,
                                                                             monkeypatch):
    """Resolved once (a relative dataset and cache path made absolute), frozen, and the very
    settings result.json records."""
    import pydantic

    from distillprompt.optimizer import Callback

    heard: list = []

    class Listener(Callback):
        def on_settings(self, settings):
            heard.append(settings)

        def on_finish(self, result):
            try:
                heard[0].optimizer.rounds = 9
            except pydantic.ValidationError as error:
                heard.append(error)

    monkeypatch.chdir(reviews_dir.parent)
    given = load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model"},
        "data": {"dataset": reviews_dir.name, "train_size": 12, "test_size": 10},
        "optimizer": {"epochs": 1},
        "cache": {"path": "cache.sqlite"}, "output": str(tmp_path / "out"), "executor": "local",
    })
    result, folder = asyncio.run(runner.optimize(given, callbacks=[Listener()]))
    final, refused = heard
    assert final.data.dataset == str(reviews_dir) and final.cache.path == reviews_dir.parent / "cache.sqlite"
    assert given.data.dataset == reviews_dir.name  # what was given stays as given
    assert "frozen" in str(refused) and final.optimizer.rounds == 1
    assert json.loads((folder / "result.json").read_text())["settings"] == final.public_dict()
