"""Capable optimizer models: long structured replies become candidates whole, reasoning
answers are scored fairly, and a validation sample decides between the round's best."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from distillprompt import runner, templates
from distillprompt.candidates import Extraction, extract_candidate
from distillprompt.data import Example, Task
from distillprompt.metrics import parse_label
from distillprompt.settings import load_settings
from tests.capable import WRAPPINGS, CapableModel, structured_prompt, wrap
from tests.conftest import review_rows, run_cli, write_jsonl
from tests.endpoint import ScriptedEndpoint

EXAMPLES = [
    Example(index=0, inputs={"text": "The soundtrack was wonderful and moving."}, target="positive"),
    Example(index=1, inputs={"text": "The pacing was tedious from start to end."}, target="negative"),
]
TASK = Task(
    name="reviews", source="memory", task_type="classification", input_columns=["text"], label_column="label",
    labels=["negative", "positive"], train=EXAMPLES, test=EXAMPLES, train_split="train", test_split="test",
)
INITIAL = templates.default_initial_prompt(TASK)  # 78 characters
BOUND = 3 * 1024  # the default length bound at the default --meta-max-tokens


def metas() -> dict[str, templates.MetaPrompt]:
    return {
        "rewrite": templates.rewrite(TASK, INITIAL, 0.704, "macro-F1"),
        "distill": templates.distill(TASK, INITIAL, EXAMPLES),
        "compress": templates.compress(TASK, INITIAL),
        "aggregate": templates.aggregate(TASK, [INITIAL, "Say whether the review is positive or negative."]),
        "paraphrase": templates.paraphrase(TASK, INITIAL),
    }


def after_stop(reply: str) -> str:
    """What the client receives: the endpoint stops generating at <END>."""
    return reply.split("<END>")[0]


# ----- hygiene ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", WRAPPINGS)
@pytest.mark.parametrize("stage", ["rewrite", "distill", "compress", "aggregate", "paraphrase"])
def test_a_structured_reply_becomes_its_prompt_whole(stage: str, style: str) -> None:
    for variant in range(6):
        prompt = structured_prompt(stage, style, variant)
        assert 300 <= len(prompt) <= 1100 and len(prompt) > 4 * len(INITIAL)
        extraction = extract_candidate(after_stop(wrap(prompt, style)), metas()[stage], BOUND)
        assert extraction == Extraction(prompt, None), (style, variant)


def test_headings_lists_quotes_and_answer_tags_survive_unchanged() -> None:
    prompt = (
        "You are a careful annotator of product reviews.\n"
        "\n"
        "Key patterns observed in the examples:\n"
        "1. Reviews that \"would buy again\" are positive.\n"
        "   - Even when they mention a flaw.\n"
        "2. Complaints about delivery alone do not make a review negative.\n"
        "\n"
        "Lessons from the labelled examples:\n"
        "- Sarcasm (\"just perfect, it broke on day one\") is negative.\n"
        "\n"
        "Output format:\n"
        "Think briefly, then answer with <ans>positive</ans> or <ans>negative</ans>."
    )
    for stage, meta in metas().items():
        assert extract_candidate(f"<START>\n{prompt}\n", meta, BOUND) == Extraction(prompt, None), stage


def test_echoed_examples_and_their_heading_are_stripped_the_rest_kept() -> None:
    meta = metas()["distill"]
    prompt = "Classify the overall opinion of the review.\n\nGuidelines:\n- Weigh emotional words above plot details."
    echoed = (
        "Examples:\nInput: The soundtrack was wonderful and moving.\nCorrect answer: positive\n\n" + prompt
    )
    assert extract_candidate(f"<START>{echoed}<END>", meta, BOUND) == Extraction(prompt, None)


def test_length_is_bounded_absolutely_and_runaway_replies_are_caught() -> None:
    meta = metas()["rewrite"]
    long_prompt = structured_prompt("long", 1) + "\n" + "\n".join(
        f"- Rule {i}: consider aspect number {i} of the review before you decide." for i in range(25)
    )
    assert 1500 < len(long_prompt) < BOUND
    assert extract_candidate(f"<START>{long_prompt}<END>", meta, BOUND) == Extraction(long_prompt, None)
    pasted = "Read the review. " + " ".join(f"Note {i} about a different detail of the text." for i in range(120))
    assert extract_candidate(f"<START>{pasted}", meta, BOUND) == Extraction(None, "too_long")
    looping = "Decide the sentiment.\n" + "Focus on the overall tone of the review.\n" * 12
    assert extract_candidate(f"<START>{looping}", meta, BOUND) == Extraction(None, "repetition")


# ----- answers that reason ---------------------------------------------------------------


def test_the_last_tagged_answer_is_the_answer() -> None:
    labels = ["negative", "positive"]
    reasoning = (
        "The answer format is <ans>label</ans>. At first glance the word 'tedious' suggests <ans>negative</ans>, "
        "but the writer ends by recommending the film.\n<ans>positive"
    )
    assert parse_label(reasoning, labels) == "positive"
    assert parse_label("It praises the cast but not the plot. Overall: negative", labels) == "negative"
    # cut off by the budget mid-reasoning, no tag: the last label it reached
    assert parse_label("The review is positive about the music, although the", labels) == "positive"
    assert parse_label("<ans>Positive.</ans>", labels) == "positive"
    assert parse_label("no idea", labels) is None
    assert parse_label("entailment, not not_entailment", ["entailment", "not_entailment"]) == "not_entailment"


def _settings(endpoint: ScriptedEndpoint, dataset: Path, tmp_path: Path, **optimizer) -> object:
    data = {"dataset": str(dataset), "train_size": optimizer.pop("train_size", 12), "test_size": 10,
            "val_size": optimizer.pop("val_size", 0)}
    return load_settings({
        "llm": {"base_url": endpoint.base_url, "model": "test-model", "backoff_base": 0.01, **optimizer.pop("llm", {})},
        "data": data,
        "optimizer": {"epochs": optimizer.pop("epochs", 1), **optimizer},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "output": str(tmp_path / "out"),
        "executor": "local",
    })


def test_two_rounds_with_a_capable_model_keep_every_reply_whole(reviews_dir, tmp_path):
    model = CapableModel()
    with ScriptedEndpoint(responder=model) as endpoint:
        result, _ = asyncio.run(runner.optimize(_settings(endpoint, reviews_dir, tmp_path, epochs=2)))
    assert result.rejections == {}
    per_round = Counter(c.round for c in result.history if c.stage not in ("initial", "demos"))
    assert per_round == {1: 16, 2: 16}
    assert Counter(c.round for c in result.history if c.stage == "demos") == {1: 2, 2: 2}
    intended = set(model.intended.values())
    assert len(intended) == 32
    for candidate in result.history[1:]:
        if candidate.stage != "demos":  # a demos candidate is the best instruction and examples, not a reply
            assert candidate.bare_instruction in intended, candidate.prompt[:80]
    # every rule line of every reply is in the candidate it became
    rules = [line for prompt in intended for line in prompt.splitlines() if line.lstrip().startswith(("-", "1", "2"))]
    prompts = "\n".join(c.prompt for c in result.history)
    assert rules and all(line in prompts for line in rules)


def test_scoring_leaves_room_for_reasoning_on_an_endpoint(reviews_dir, tmp_path):
    model = CapableModel(reasoning=True)
    initial = "Think step by step about the writer's overall sentiment, then give the label."
    with ScriptedEndpoint(responder=model) as endpoint:
        settings = _settings(endpoint, reviews_dir, tmp_path, initial_prompt=initial)
        result, _ = asyncio.run(runner.optimize(settings))
        budgets = {entry.max_tokens for entry in endpoint.requests(kind="scoring")}
    assert budgets == {256}
    assert result.initial_scores["train"]["parse_rate"] == 1.0
    initial_outputs = [row["output"] for row in json.loads((tmp_path / "out" / "result.json").read_text())
                       ["test_outputs"]["initial"]]
    assert all(output.startswith("The review describes") for output in initial_outputs)


def test_the_answer_budget_is_configurable(endpoint, reviews_dir, tmp_path):
    settings = _settings(endpoint, reviews_dir, tmp_path, llm={"answer_max_tokens": 40})
    asyncio.run(runner.optimize(settings))
    assert {entry.max_tokens for entry in endpoint.requests(kind="scoring")} == {40}


# ----- selection on a validation sample -------------------------------------------------


OVERFIT = "Remember the exact reviews you were shown."
ROBUST = "Weigh the overall sentiment of the whole review."


def split_dataset(folder: Path) -> Path:
    write_jsonl(folder / "train.jsonl", review_rows(40, seed=1))
    write_jsonl(folder / "validation.jsonl", review_rows(20, seed=3))
    write_jsonl(folder / "test.jsonl", review_rows(20, seed=2))
    return folder


def overfitting_model(request, kind, stage):
    """Rewrites: one that memorises (every train review right, validation reviews wrong), one
    that generalises (right on validation, wrong on a few train reviews), two plain ones.
    Later stages keep what they were given, so the round has no better prompt."""
    content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
    if kind == "meta":
        if stage == "rewrite":
            extra = {0: OVERFIT, 1: ROBUST}.get(request["_sample"], f"Plain rewrite {request['_sample']}.")
            return f"<START>Classify the review as positive or negative. {extra}<END>"
        instruction = content.split("Instruction:\n", 1)[-1].split("\n\n")[0]
        if stage == "aggregate":
            instruction = "Classify the review as positive or negative."
        return f"<START>{instruction}<END>"
    if kind == "scoring":
        instruction = content.split("\n\nPossible answers:")[0]
        text = content.split("Input: ", 1)[-1]
        truth = "positive" if any(w in text for w in ("great", "wonderful", "excellent", "delightful", "superb",
                                                       "charming", "fun", "beautiful")) else "negative"
        wrong = "negative" if truth == "positive" else "positive"
        in_train = "(review 1-" in text
        if OVERFIT in instruction:
            return f"<ans>{truth if in_train else wrong}</ans>"
        if ROBUST in instruction:
            row = int(text.split("(review 1-")[1].split(")")[0]) if in_train else 0
            return f"<ans>{wrong if in_train and row % 4 == 0 else truth}</ans>"
        return f"<ans>{truth if in_train and ('1-1' in text or '1-3' in text) else 'positive'}</ans>"
    return None


def test_validation_picks_a_lower_train_score_that_generalises(tmp_path):
    dataset = split_dataset(tmp_path / "data")
    outcomes = {}
    for val_size in (0, 20):
        with ScriptedEndpoint(responder=overfitting_model) as endpoint:
            settings = _settings(endpoint, dataset, tmp_path / f"v{val_size}", train_size=20, val_size=val_size)
            result, _ = asyncio.run(runner.optimize(settings))
            validation = [e for e in endpoint.requests(kind="scoring") if "(review 3-" in e.content]
        outcomes[val_size] = (result, validation)
    on_train, _ = outcomes[0]
    assert OVERFIT in on_train.final_prompt
    assert "val" not in on_train.final_scores
    on_val, asked = outcomes[20]
    assert ROBUST in on_val.final_prompt
    overfit = next(c for c in on_val.history if OVERFIT in c.prompt and c.duplicate_of is None)
    assert on_val.final.score < overfit.score and on_val.final.val_score > overfit.val_score
    assert on_val.task["val_size"] == 20
    # the initial prompt and the round's top three by train score were scored on validation
    assert len(asked) == 20 * 4
    assert on_val.final_scores["test"]["score"] > on_train.final_scores["test"]["score"]


def test_validation_never_overlaps_train_or_a_held_out_test(tmp_path):
    from distillprompt.data import load_task

    write_jsonl(tmp_path / "only.jsonl", review_rows(60, seed=9))
    settings = load_settings({"data": {"dataset": str(tmp_path / "only.jsonl"), "train_size": 20, "test_size": 15,
                                       "val_size": 25}})
    task = load_task(settings.data, seed=4)
    texts = [{e.inputs["text"] for e in sample} for sample in (task.train, task.val, task.test)]
    assert [len(t) for t in texts] == [20, 25, 15]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert task.val_split == "train (held out)"


def test_the_summary_says_whether_the_final_prompt_beat_the_initial_one(endpoint, reviews_dir, tmp_path):
    done = run_cli(
        "optimize", "--base-url", endpoint.base_url, "--model", "test-model", "--dataset", str(reviews_dir),
        "--train-size", "12", "--test-size", "30", "--epochs", "1", "--executor", "local", "--quiet",
        "--cache-path", str(tmp_path / "c.sqlite"), "--output", str(tmp_path / "out"), "--val-size", "10",
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    verdict = saved["verdict"]
    assert verdict["outcome"] in ("better", "within_noise", "not_better", "kept_initial")
    assert verdict["sentence"] in done.stdout
    assert "validation: score" in done.stdout
    if verdict["outcome"] in ("not_better", "kept_initial"):
        assert "try" in verdict["sentence"]  # what to try for a real gain
