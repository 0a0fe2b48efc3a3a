"""The test verdict judges the metric the run optimizes: a prompt that fixes the target's
lean to one label gains far more in macro-F1 than in accuracy, and the run must say it
gained (the race must not stop it either)."""

from __future__ import annotations

import asyncio
import json

from distillprompt import runner
from distillprompt.settings import load_settings
from tests.conftest import review_rows, write_jsonl
from tests.endpoint import ScriptedEndpoint, fraction, scoring_parts, true_label

BALANCED = "Balanced: weigh both labels."


def leaning_target(request, kind, stage):
    """The initial prompt gets "negative" for every input (accuracy 0.5 on balanced data,
    macro-F1 0.33); the one rewrite the optimizer writes answers each input right as often
    as not (accuracy about the same, macro-F1 about 0.5)."""
    if kind == "meta" and stage != "grips_paraphrase":
        return f"<START>{BALANCED}<END>"
    if kind != "scoring":
        return None
    content = "\n".join(str(m.get("content", "")) for m in request["messages"])
    instruction, labels, text = scoring_parts(content)
    if BALANCED not in instruction:
        return "<ans>negative</ans>"
    truth = true_label(text, labels)
    right = fraction("balanced", text) < 0.5
    return f"<ans>{truth if right else next(label for label in labels if label != truth)}</ans>"


def test_a_gain_in_macro_f1_is_a_gain_though_accuracy_barely_moves(tmp_path):
    dataset = tmp_path / "reviews"
    write_jsonl(dataset / "train.jsonl", review_rows(60, seed=31))
    write_jsonl(dataset / "test.jsonl", review_rows(200, seed=32))
    settings = load_settings({
        "llm": {"base_url": "http://placeholder/v1", "model": "test-model", "backoff_base": 0.01},
        "data": {"dataset": str(dataset), "train_size": 60, "test_size": 200},
        "optimizer": {"rounds": 1, "demos": 0},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })
    with ScriptedEndpoint(responder=leaning_target) as endpoint:
        settings = settings.with_changes(llm={"base_url": endpoint.base_url})
        result, folder = asyncio.run(runner.optimize(settings))
    assert result.final.bare_instruction == BALANCED  # the race kept it, selection chose it
    verdict = result.verdict
    initial, final = result.initial_scores["test"], result.final_scores["test"]
    assert final["macro_f1"] - initial["macro_f1"] > 0.1
    assert abs(final["accuracy"] - initial["accuracy"]) < 0.1
    # judged on macro-F1: its interval is above zero, while accuracy's straddles it
    assert verdict.outcome == "better" and verdict.low > 0
    assert verdict.difference == final["macro_f1"] - initial["macro_f1"]
    assert verdict.accuracy_low < 0 < verdict.accuracy_high
    assert "macro-F1 difference" in verdict.sentence and "accuracy" in verdict.sentence
    saved = json.loads((folder / "result.json").read_text())["verdict"]
    assert saved["outcome"] == "better" and saved["accuracy_difference"] == verdict.accuracy_difference
