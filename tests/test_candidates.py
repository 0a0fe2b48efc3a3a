"""Candidate hygiene: extract_tagged and extract_candidate with the real meta-prompts."""

from __future__ import annotations

import pytest

from distillprompt import templates
from distillprompt.candidates import Extraction, extract_candidate, extract_tagged
from distillprompt.data import Example, Task

EXAMPLES = [
    Example(index=0, inputs={"text": "The soundtrack was wonderful and moving."}, target="positive"),
    Example(index=1, inputs={"text": "The pacing was tedious from start to end."}, target="negative"),
    Example(index=2, inputs={"text": "A charming cast carries a thin story."}, target="positive"),
]
TASK = Task(
    name="reviews",
    source="memory",
    task_type="classification",
    input_columns=["text"],
    label_column="label",
    labels=["negative", "positive"],
    train=EXAMPLES,
    test=EXAMPLES,
    train_split="train",
    test_split="test",
)
PARENT = "Classify the sentiment of the review as positive or negative."
OTHER_PARENT = "Say whether the review below is positive or negative."
NEW = "Decide whether the review praises or criticises the work, then answer with its label."
BOUND = 3 * 1024  # the default length bound: 3 characters per token of --meta-max-tokens


def metas() -> dict[str, templates.MetaPrompt]:
    return {
        "rewrite": templates.rewrite(TASK, PARENT, 0.362, "macro_f1"),
        "distill": templates.distill(TASK, PARENT, EXAMPLES),
        "compress": templates.compress(TASK, PARENT),
        "aggregate": templates.aggregate(TASK, [PARENT, OTHER_PARENT]),
        "paraphrase": templates.paraphrase(TASK, PARENT),
    }


STAGES = list(metas())


def extract(reply: str, stage: str = "rewrite", bound: int = BOUND) -> Extraction:
    return extract_candidate(reply, metas()[stage], bound)


# ----- extract_tagged ------------------------------------------------------------------


def test_tagged_both_tags() -> None:
    assert extract_tagged(f"<START>{NEW}<END>") == NEW
    assert extract_tagged(f"<START>\n  {NEW}\n<END>") == NEW
    assert extract_tagged(f"< start >{NEW}</end>") == NEW  # spacing, case and a closing slash are forgiven


def test_tagged_only_start() -> None:
    assert extract_tagged(f"Here you go:\n<START>\n{NEW}") == NEW


def test_tagged_only_end() -> None:
    assert extract_tagged(f"{NEW}\n<END>\nHope this helps!") == NEW


def test_tagged_no_tags_is_whole_reply() -> None:
    assert extract_tagged(f"  {NEW}\n") == NEW


def test_tagged_chatter_around_tags() -> None:
    reply = f"Sure! I studied the task.\n<START>{NEW}<END>\nThis version is clearer because it names the labels."
    assert extract_tagged(reply) == NEW


def test_tagged_skips_an_empty_pair() -> None:
    assert extract_tagged(f"<START> <END> oops, again: <START>{NEW}<END>") == NEW


def test_tagged_empty() -> None:
    assert extract_tagged("") == ""
    assert extract_tagged(None) == ""
    assert extract_tagged("<START><END>") == ""


# ----- extract_candidate: tags and chatter ---------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "reply",
    [
        f"<START>{NEW}<END>",
        f"<START>{NEW}",
        f"{NEW}<END>",
        NEW,
        f"Sure! Here is the improved instruction:\n<START>\n{NEW}\n<END>\nI hope this helps.",
        f"Here is the new instruction:\n{NEW}",
        f"<START>\nNew instruction:\n{NEW}\n<END>",
        f"<START>Instruction: {NEW}<END>",
        f'<START>"{NEW}"<END>',
        f"<START>```\n{NEW}\n```<END>",
    ],
)
def test_candidate_is_extracted(reply: str, stage: str) -> None:
    assert extract(reply, stage) == Extraction(NEW, None)


@pytest.mark.parametrize("stage", STAGES)
def test_good_reply_kept_unchanged(stage: str) -> None:
    good = (
        "Read the review carefully and decide whether the writer liked the film overall.\n"
        "\n"
        "Mixed reviews count as negative when the criticism outweighs the praise.\n"
        "Answer with one word: positive or negative."
    )
    assert extract(f"<START>\n{good}\n<END>", stage) == Extraction(good, None)


# ----- extract_candidate: echoes -------------------------------------------------------


def test_echo_of_score_line_removed_instruction_kept() -> None:
    reply = f"<START>The prompt scored 0.362, with 1.0 being the maximum. {NEW}<END>"
    assert extract(reply, "rewrite") == Extraction(NEW, None)
    reply = f"<START>The prompt scored 0.362, with 1.0 being the maximum.\n{NEW}<END>"
    assert extract(reply, "rewrite") == Extraction(NEW, None)


def test_echo_of_the_meta_prompts_own_score_sentence_removed() -> None:
    meta = metas()["rewrite"]
    score_sentence = next(fragment for fragment in meta.echo_fragments if "0.362" in fragment)
    assert score_sentence in meta.messages[0]["content"]
    assert extract(f"<START>{score_sentence} {NEW}<END>", "rewrite") == Extraction(NEW, None)


@pytest.mark.parametrize("stage", STAGES)
def test_echo_of_meta_instructions_removed(stage: str) -> None:
    meta = metas()[stage]
    content = meta.messages[0]["content"]
    # The first two echo fragments of every meta-prompt are its own instructions to the
    # optimizer (its role, then what to do); the task summary is not an echo.
    role, instruction = meta.echo_fragments[0], meta.echo_fragments[1]
    assert role in content and instruction in content
    reply = f"<START>{role}\n{instruction}\n{NEW}<END>"
    assert extract(reply, stage) == Extraction(NEW, None)


def test_echo_of_a_single_instruction_sentence_removed() -> None:
    reply = f"<START>Propose a different and better instruction for the same task. {NEW}<END>"
    assert extract(reply, "rewrite") == Extraction(NEW, None)
    reply = f"<START>{NEW} Keep every idea that matters for solving the task and drop repetition and filler.<END>"
    assert extract(reply, "compress") == Extraction(NEW, None)


def test_pasted_distill_examples_removed() -> None:
    pasted = (
        "Input: The soundtrack was wonderful and moving.\n"
        "Correct answer: positive\n"
        "\n"
        "Input: The pacing was tedious from start to end.\n"
        "Correct answer: negative"
    )
    assert extract(f"<START>{NEW}\n\n{pasted}<END>", "distill") == Extraction(NEW, None)


def test_pasted_distill_example_text_removed_from_a_sentence() -> None:
    reply = f"<START>{NEW}\nA charming cast carries a thin story.<END>"
    assert extract(reply, "distill") == Extraction(NEW, None)


# ----- extract_candidate: drops --------------------------------------------------------


@pytest.mark.parametrize("reply", ["", "   \n", "<START><END>", "<START>\n\n<END>", '<START>""<END>', "<START>```\n```<END>"])
def test_empty_reply(reply: str) -> None:
    assert extract(reply) == Extraction(None, "empty")


def test_none_reply_is_empty() -> None:
    assert extract(None) == Extraction(None, "empty")


@pytest.mark.parametrize("stage", STAGES)
def test_reply_that_is_only_echo(stage: str) -> None:
    meta = metas()[stage]
    echoed = "\n".join(meta.echo_fragments[:3])
    assert extract(f"<START>{echoed}<END>", stage) == Extraction(None, "echo")


def test_reply_that_is_only_a_score_line() -> None:
    assert extract("<START>The prompt scored 0.362, with 1.0 being the maximum.<END>") == Extraction(None, "echo")


def test_answer_tags_in_a_format_instruction_are_kept() -> None:
    prompt = f"{NEW} Write it as <ans>label</ans>."
    assert extract(f"<START>{prompt}<END>") == Extraction(prompt, None)


def test_leftover_start_tag() -> None:
    assert extract(f"<START>{NEW}</START>") == Extraction(None, "tags")


def test_length_is_never_judged_against_the_parent() -> None:
    long_reply = " ".join(f"Rule {i}: weigh every clue about the tone of the review." for i in range(3))
    assert len(long_reply) > 4 * len("Label the review.")
    assert extract(f"<START>{long_reply}<END>") == Extraction(long_reply, None)


def test_absolute_length_bound_is_inclusive_and_zero_means_none() -> None:
    exactly = "Answer with the label only."  # 27 characters
    assert extract(f"<START>{exactly}<END>", bound=27) == Extraction(exactly, None)
    assert extract(f"<START>{exactly}<END>", bound=26) == Extraction(None, "too_long")
    assert extract(f"<START>{exactly}<END>", bound=0) == Extraction(exactly, None)


# ----- over-eager echo filtering -------------------------------------------------------


def test_instruction_mentioning_a_rating_score_is_kept() -> None:
    good = "A review that gives a score of 4.5 or more is positive."
    assert extract(f"<START>{good}<END>") == Extraction(good, None)


def test_instruction_restating_the_labels_is_kept() -> None:
    good = "Answer with one of these labels: negative, positive."
    assert extract(f"<START>{good}<END>") == Extraction(good, None)


# ----- an untagged reply that quotes its answer -------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        f'Here is a new version of the instruction:\n\n"{NEW}"',
        f'You can say it differently. Here\'s an alternative edit of the original instruction:\n\n"{NEW}"',
        f'The original text read: "{PARENT}" The new instruction is:\n\n\u201c{NEW}\u201d',
        f'The example text reads: "{NEW}"',
    ],
)
def test_an_untagged_reply_that_introduces_and_quotes_its_answer(reply: str) -> None:
    assert extract(reply) == Extraction(NEW, None)


def test_a_quote_inside_tags_is_part_of_the_prompt() -> None:
    prompt = f'{NEW} A review that reads: "the cast was wonderful" is positive.'
    assert extract(f"<START>{prompt}<END>").prompt == prompt
    tagged_quote = 'Label the review. For instance the text reads: "the cast was wonderful and fun"'
    assert extract(f"<START>{tagged_quote}<END>").prompt == tagged_quote


def test_a_closing_quote_without_an_introduction_is_kept() -> None:
    prompt = f'{NEW} Example: "The pacing was tedious from start to end"'
    assert extract(prompt, stage="rewrite").prompt == prompt


# ----- echo in other framing ---------------------------------------------------------------


def test_a_meta_instruction_reworded_around_its_words_is_removed_with_its_list_number() -> None:
    # Qwen2.5-1.5B's distilled candidate that won its round on sst5: its third rule is the
    # meta-prompt's instruction to the optimizer, not a rule for the model that answers.
    meta = templates.distill(TASK, PARENT, EXAMPLES, mistakes="")
    assert "state the general rules that tell the answers apart" in meta.messages[0]["content"]
    rules = 'Classify the review. If unsure, follow these rules:\n1. "good" means positive.\n2. "bad" means negative.'
    reply = f"<START>{rules}\n3. Make sure to state the general rules that tell the answers apart.<END>"
    assert extract_candidate(reply, meta, BOUND) == Extraction(rules, None)
    reworded = "Avoid copying the examples or their answers into the instruction."
    assert extract(f"<START>{NEW} {reworded}<END>", "distill") == Extraction(NEW, None)


def test_a_rule_that_shares_a_few_words_with_the_meta_prompt_is_kept() -> None:
    # "the examples or their answers" (5 words) and a long rule that borrows one run of the
    # meta-prompt's words among more of its own stay: only mostly-borrowed sentences go.
    short_run = "Never repeat the examples or their answers verbatim when you reply."
    long_rule = ('If you make a mistake, replace "negative" with "very negative", "positive" with "very positive", '
                 "and state the general rules that tell the answers apart.")
    # A rule made of the mistakes the meta-prompt counted is distillation, not echo.
    counted = ('With this instruction the model was right on 7 of 10 examples. Its most frequent mistakes: '
               '"positive" where the correct answer is "negative" (3 times).')
    restated = 'Avoid answering "positive" where the correct answer is "negative": irony reads as praise.'
    meta = templates.distill(TASK, PARENT, EXAMPLES, mistakes=counted)
    for prompt in (short_run, long_rule, "1. Answer with one label.\n2. Use lower case.", restated):
        assert extract_candidate(f"<START>{prompt}<END>", meta, BOUND) == Extraction(prompt, None)
