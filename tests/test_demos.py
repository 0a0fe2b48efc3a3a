"""Beyond the paper: candidates that carry solved examples (``--demos``), distillation from
the target's own mistakes (``--distill-from errors``), and ``--paper``, which turns both off;
against a scripted target for which examples in the prompt help, over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import pytest

from distillprompt import runner
from distillprompt.settings import load_settings
from tests.conftest import review_rows, write_jsonl
from tests.endpoint import ScriptedEndpoint, fraction, scoring_parts, true_label

TRAIN, TEST = 30, 10
WRITTEN = ["Plain: read the text and pick a label.", "Plain too: read it and answer.",
           "Plain again: decide the label of the text."]


def target(request, kind, stage):
    """A target that is right 6 times in 10 with a bare instruction and every time once the
    prompt shows two solved examples or more; the optimizer writes plain instructions."""
    if kind == "meta" and stage != "grips_paraphrase":
        return f"<START>{WRITTEN[request['_sample'] % len(WRITTEN)]} ({stage}){'<END>'}"
    if kind != "scoring":
        return None
    content = "\n".join(str(m.get("content", "")) for m in request["messages"])
    instruction, labels, text = scoring_parts(content)
    truth = true_label(text, labels)
    shown = instruction.count("Answer: <ans>")
    right = shown >= 2 or fraction("bare", instruction, text) < 0.6
    return f"<ans>{truth if right else next(label for label in labels if label != truth)}</ans>"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A train split of 60 rows (30 of them outside the train sample: the demos' pool) and a
    test split of 10."""
    folder = tmp_path_factory.mktemp("demo-reviews")
    write_jsonl(folder / "train.jsonl", review_rows(60, seed=21))
    write_jsonl(folder / "test.jsonl", review_rows(TEST, seed=22))
    return folder


def settings_for(endpoint, dataset, tmp_path, **optimizer):
    return load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01},
        "data": {"dataset": str(dataset), "train_size": TRAIN, "test_size": TEST},
        "optimizer": {"rounds": optimizer.pop("rounds", 2), **optimizer},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })


def test_a_prompt_with_solved_examples_can_win_and_keeps_them(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        result, folder = asyncio.run(runner.optimize(settings_for(endpoint, reviews, tmp_path, demos=3, demo_draws=2)))
    from distillprompt.data import load_task

    task = load_task(load_settings({"data": {"dataset": str(reviews), "train_size": TRAIN, "test_size": TEST}}).data, 0)
    in_samples = {example.index for example in task.train}
    demos = [c for c in result.history if c.stage == "demos"]
    assert Counter(c.round for c in demos) == {1: 2, 2: 2}
    for candidate in demos:
        # three solved examples of the train split, none of them in the train sample, both labels
        assert len(candidate.demos) == 3 and not set(candidate.demos) & in_samples
        assert candidate.note == "examples: train-split rows " + ", ".join(map(str, candidate.demos))
        assert candidate.prompt.startswith(candidate.bare_instruction + "\n\nExamples:")
        assert candidate.prompt.count("Answer: <ans>") == 3
        shown = re.findall(r"Answer: <ans>(\w+)</ans>", candidate.prompt)
        assert set(shown) == {"positive", "negative"}
    # with examples the target is always right: the final prompt carries some
    final = result.final
    assert final.demos and final.prompt.count("Answer: <ans>") == 3
    assert result.final_scores["test"]["score"] == 1.0
    # once the best prompt carries examples, the next round's instructions keep them: rewritten
    # instructions, followed by the best prompt's examples
    best_after_one = next(c for c in result.history if c.id == result.rounds[0].best_id)
    assert best_after_one.demos
    round_two = [c for c in result.history if c.round == 2 and c.stage not in ("demos",)]
    assert round_two and all(c.demos == best_after_one.demos for c in round_two)
    assert all(c.bare_instruction.startswith("Plain") for c in round_two)
    # and the record says where the examples came from
    record = json.loads((folder / "result.json").read_text())
    assert record["final_prompt"] == final.prompt
    assert next(c for c in record["history"] if c["id"] == final.id)["demos"] == final.demos


def test_without_spare_rows_no_demos_candidate_is_made_and_the_run_says_why(reviews_dir, tmp_path):
    """The 80-row train split of reviews_dir taken whole by the train sample: no row is left
    that no candidate is scored on, so no demos candidate is made; the drop is counted."""
    with ScriptedEndpoint(responder=target) as endpoint:
        settings = settings_for(endpoint, reviews_dir, tmp_path, rounds=1, demos=2).with_changes(data={"train_size": 80})
        result, _ = asyncio.run(runner.optimize(settings))
    assert not [c for c in result.history if c.stage == "demos"]
    assert result.rejections["demos"] == {"no_spare_rows": 1}


def test_distillation_studies_the_mistakes_it_already_paid_for(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        result, _ = asyncio.run(runner.optimize(
            settings_for(endpoint, reviews, tmp_path, rounds=1, demos=0, distill_from="errors", distill_examples=5)
        ))
        distills = [entry.content for entry in endpoint.requests(kind="meta", stage="distill")]
        scoring = len(endpoint.requests(kind="scoring"))
    assert len(distills) == 4
    for content in distills:
        assert "several of the model's answers are wrong" in content
        shown = re.findall(r"Correct answer: (\w+)\nThe model's answer: (\w+)", content)
        assert len(shown) == 5
        wrong = [pair for pair in shown if pair[0] != pair[1]]
        # three of five are mistakes (the sources are right 6 times in 10: there are enough),
        # the others right answers; both labels among them
        assert len(wrong) == 3 and len(shown) - len(wrong) == 2
        assert {correct for correct, _ in shown} == {"positive", "negative"}
        # and a line counts the source's mistakes over every example it was scored on
        counted = re.search(r"the model was right on (\d+) of (\d+) examples\. Its most frequent mistakes: (.*)\.\n", content)
        assert counted and int(counted.group(1)) < int(counted.group(2))
        assert re.search(r'"(positive|negative)" where the correct answer is "(negative|positive)" \(\d+ times?\)',
                         counted.group(3))
    # nothing was scored to find them: every scoring request is a candidate's train scoring
    # (what its race paid) or the test sample's
    trained = sum(c.examples_scored or 0 for c in result.history if c.duplicate_of is None)
    tested = TEST * (1 if result.final.id == result.initial.id else 2)
    assert scoring == trained + tested


def test_paper_runs_the_method_as_the_paper_describes_it(reviews, tmp_path):
    with ScriptedEndpoint(responder=target) as endpoint:
        settings = settings_for(endpoint, reviews, tmp_path, rounds=1, paper=True)
        assert (settings.optimizer.demos, settings.optimizer.distill_from, settings.optimizer.scoring) == (0, "random", "full")
        result, _ = asyncio.run(runner.optimize(settings))
        distills = [entry.content for entry in endpoint.requests(kind="meta", stage="distill")]
    assert not [c for c in result.history if c.stage == "demos"] and "demos" not in result.rejections
    assert all(c.examples_scored == TRAIN for c in result.history if c.duplicate_of is None)
    assert distills and all("Study the solved examples" in text and "The model's answer" not in text for text in distills)
    # a flag given beside --paper wins over it
    explicit = load_settings({"optimizer": {"paper": True, "demos": 2, "scoring": "race"}})
    assert (explicit.optimizer.demos, explicit.optimizer.distill_from, explicit.optimizer.scoring) == (2, "random", "race")
