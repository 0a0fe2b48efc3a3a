"""The task template and the five meta-prompts of the method, in this project's own words.

Each meta-prompt builder returns a ``MetaPrompt``: the chat messages to send and the
fragments of its own fixed text (instructions, score line, pasted examples) that a weak
model may echo back, so that candidate hygiene can strip them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

from .data import Example, Task
from .metrics import ANSWER_CLOSE, ANSWER_OPEN, ANSWER_STOP
from .settings import LLMSettings

START, END = "<START>", "<END>"
META_STOP = (END,)  # a meta reply is complete once the closing tag is written


@dataclass(frozen=True)
class MetaPrompt:
    stage: str
    messages: list[dict[str, str]]
    # the meta-prompt's own instructions to the optimizer: a sentence that repeats one, or is
    # mostly made of runs of their words, is echo
    echo_fragments: list[str] = field(default_factory=list)
    # what else it shows (a line label, the count of the model's mistakes): echo only when
    # repeated whole, since a rule may well restate a mistake in its words
    data_fragments: list[str] = field(default_factory=list)
    example_texts: list[str] = field(default_factory=list)
    # the same meta-prompt showing one example fewer (its longest), for an endpoint that
    # refused this one as too long for its context; None: nothing to leave out
    fewer: Callable[[], MetaPrompt] | None = field(default=None, compare=False, repr=False)


# ----- the task template ---------------------------------------------------------------


def default_initial_prompt(task: Task) -> str:
    inputs = " and ".join(column.replace("_", " ") for column in task.input_columns)
    if task.is_classification:
        return f"Read the {inputs} and answer with the label that fits it best: {', '.join(task.labels)}."
    return f"Read the {inputs} and write the answer."


def render_inputs(task: Task, example: Example) -> str:
    if len(task.input_columns) == 1:
        return f"Input: {example.inputs[task.input_columns[0]]}"
    return "\n".join(f"{column.replace('_', ' ').capitalize()}: {example.inputs[column]}" for column in task.input_columns)


PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")


def placeholders(text: str) -> set[str]:
    """The ``{{variable}}`` names in a template (MLflow's prompt syntax; spaces allowed inside)."""
    return set(PLACEHOLDER.findall(text))


def is_full_template(task: Task, prompt: str) -> bool:
    """A prompt with a ``{{column}}`` placeholder for every input is a whole request template
    (as registered), not an instruction to wrap."""
    return all("{{" + column + "}}" in prompt for column in task.input_columns)


def task_messages(task: Task, instruction: str, example: Example) -> list[dict[str, str]]:
    """The request that scores one instruction on one example.

    The instruction comes first and the input last, so requests for one instruction share
    a long prefix (servers with prefix caching reuse it). A full template is filled as is.
    """
    return message_maker(task, instruction)(example)


def message_maker(task: Task, instruction: str) -> Callable[[Example], list[dict[str, str]]]:
    """``task_messages`` for one instruction and any example: the parts that do not depend
    on the example are built once (a stage builds thousands of requests per instruction)."""
    if is_full_template(task, instruction):
        columns = task.input_columns

        def filled(example: Example) -> list[dict[str, str]]:
            content = instruction
            for column in columns:
                content = content.replace("{{" + column + "}}", example.inputs[column])
            return [{"role": "user", "content": content}]

        return filled
    head = [instruction.strip()]
    if task.is_classification:
        head.append(f"Possible answers: {', '.join(task.labels)}.")
        # "one word from the possible answers": small models answer in a parseable form more
        # often than with "give only the answer" (docs/decisions.md)
        single_words = all(len(label.split()) == 1 for label in task.labels)
        choice = "one word from the possible answers" if single_words else "one of the possible answers"
        tail = f"Answer with {choice}, written as {ANSWER_OPEN}label{ANSWER_CLOSE}."
    else:
        tail = f"Give the final answer between {ANSWER_OPEN} and {ANSWER_CLOSE}."
    prefix = "\n\n".join(head) + "\n\n"
    suffix = "\n\n" + tail

    def wrapped(example: Example) -> list[dict[str, str]]:
        return [{"role": "user", "content": prefix + render_inputs(task, example) + suffix}]

    return wrapped


REASONING_ANSWER_TOKENS = 256


def answer_max_tokens(task: Task, configured: int | None, *, embedded: bool) -> int:
    """The answer budget of a scoring request.

    On an endpoint it leaves room for a short reasoning before the tagged answer (a prompt
    that asks the model to think first must not be cut off mid-sentence and lose by
    construction); generation still stops at the closing answer tag, so a direct answer
    costs no more. The embedded 135M model rambles, so there a classification answer gets
    the longest label plus a small margin (tags cost about 6 tokens, a token holds at least
    one character). A configured budget wins."""
    if configured:
        return configured
    if embedded and task.is_classification:
        return max(len(label) for label in task.labels) + 16
    return REASONING_ANSWER_TOKENS


def answer_budget(task: Task, llm: LLMSettings) -> int:
    """The answer budget of a run's settings (after the embedded server was started, whose
    settings say ``backend = "local"``)."""
    return answer_max_tokens(task, llm.answer_max_tokens, embedded=llm.backend == "local")


# ----- meta-prompts --------------------------------------------------------------------

_REPLY_FORMAT = f"Write only the new instruction, starting with {START} and ending with {END}."


def _task_summary(task: Task) -> str:
    if task.template_variables is not None:
        if not task.template_variables:
            return ("An application sends the instruction to a model together with each input. It has no "
                    "placeholders in double braces: add none.")
        names = ", ".join("{{" + name + "}}" for name in task.template_variables)
        return (
            f"The instruction is a template: an application fills in {names} with each input and sends it to a "
            "model. Keep every one of these placeholders, written exactly so, and add no other placeholder."
        )
    inputs = ", ".join(task.input_columns)
    if task.is_classification:
        return f"The model reads a {inputs} and must answer with one of these labels: {', '.join(task.labels)}."
    return f"The model reads a {inputs} and must write an answer."


def _meta(
    stage: str, lines: list[str], fixed: list[str], examples: list[str] | None = None, data: list[str] | None = None,
) -> MetaPrompt:
    # The task summary (fixed[1]) states the task and its labels: a candidate may well say
    # the same, so it is not treated as an echo.
    return MetaPrompt(
        stage=stage,
        messages=[{"role": "user", "content": "\n\n".join(lines)}],
        echo_fragments=[fixed[0], *fixed[2:]],
        data_fragments=data or [],
        example_texts=examples or [],
    )


def rewrite(task: Task, prompt: str, score: float, metric: str) -> MetaPrompt:
    fixed = [
        "You improve instructions that are given to a language model.",
        _task_summary(task),
        f"On a set of labelled examples the instruction below reached a {metric} of {score:.3f} out of 1.000."
        if task.template_variables is None
        else f"On the application's examples the instruction below reached a {metric} of {score:.3f} (higher is better).",
        "Propose a different and better instruction for the same task. You may change its wording, structure and "
        "emphasis; keep what works and fix what could confuse the model.",
        _REPLY_FORMAT,
    ]
    lines = fixed[:3] + [f"Instruction:\n{prompt}"] + fixed[3:]
    return _meta("rewrite", lines, fixed)


OBSERVED_LINES = (("output", "The model's answer"), ("score", "Its score"), ("notes", "Judges' notes"))


def distill(
    task: Task, prompt: str, examples: list[Example], observed: list[dict[str, str]] | None = None,
    mistakes: str | None = None,
) -> MetaPrompt:
    """``observed`` (one dict per example, when the scoring recorded them): what the model or
    app answered with the instruction below, its score and the judges' notes. ``mistakes``
    (not None): the examples are mostly ones the instruction got wrong (``Round.mistakes``),
    the meta-prompt asks what led the model astray, and a non-empty ``mistakes`` is the line
    that counts its most frequent mistakes."""
    from_errors = mistakes is not None
    shown = []
    for i, example in enumerate(examples):
        lines = [render_inputs(task, example), f"Correct answer: {example.target}"]
        seen = observed[i] if observed and i < len(observed) else {}
        lines += [f"{label}: {seen[key]}" for key, label in OBSERVED_LINES if seen.get(key)]
        shown.append("\n".join(lines))
    if from_errors:
        study = (
            "Below are examples the model answered while following the instruction: each shows the correct answer "
            "and the model's own answer, and several of the model's answers are wrong. Work out what misled the "
            "model on the wrong ones and what it did right on the others."
        )
        teach = (
            "Then rewrite the instruction so that a model following it avoids those mistakes: state the general "
            "rules that tell the answers apart. Do not copy the examples or their answers into the instruction."
        )
    else:
        study = ("Study the solved examples below and work out what a model must pay attention to in order to answer "
                 "them correctly.")
        teach = ("Then rewrite the instruction so that it teaches those general rules. Do not copy the examples or "
                 "their answers into the instruction.")
    fixed = [
        "You improve instructions that are given to a language model.",
        _task_summary(task),
        study,
        teach,
        _REPLY_FORMAT,
    ]
    counted = [mistakes] if mistakes else []
    lines = fixed[:3] + ["Examples:\n" + "\n\n".join(shown), *counted, f"Instruction:\n{prompt}"] + fixed[3:]
    texts = [value for example in examples for value in example.inputs.values()]
    labels = [f"{label}:" for _, label in OBSERVED_LINES] if observed else []
    meta = _meta("distill", lines, fixed, texts, data=["Correct answer:", *labels, *counted])
    if len(examples) < 2:
        return meta
    longest = max(range(len(examples)), key=lambda i: len(shown[i]))
    kept = [i for i in range(len(examples)) if i != longest]

    def fewer() -> MetaPrompt:
        seen = [observed[i] if i < len(observed) else {} for i in kept] if observed else observed
        return distill(task, prompt, [examples[i] for i in kept], seen, mistakes)

    return replace(meta, fewer=fewer)


def compress(task: Task, prompt: str) -> MetaPrompt:
    fixed = [
        "You shorten instructions that are given to a language model.",
        _task_summary(task),
        "Condense the instruction below into two or three sentences. Keep every idea that matters for solving the "
        "task and drop repetition and filler.",
        _REPLY_FORMAT,
    ]
    lines = fixed[:3] + [f"Instruction:\n{prompt}"] + fixed[3:]
    return _meta("compress", lines, fixed)


def aggregate(task: Task, prompts: list[str]) -> MetaPrompt:
    numbered = "\n\n".join(f"Instruction {i}:\n{prompt}" for i, prompt in enumerate(prompts, 1))
    fixed = [
        "You combine instructions that are given to a language model.",
        _task_summary(task),
        "Below are several instructions written for the same task. Merge them into a single instruction that keeps "
        "the strongest ideas of each and stays clear and concise.",
        _REPLY_FORMAT,
    ]
    lines = fixed[:3] + [numbered] + fixed[3:]
    return _meta("aggregate", lines, fixed)


def paraphrase(task: Task, prompt: str) -> MetaPrompt:
    fixed = [
        "You paraphrase instructions that are given to a language model.",
        _task_summary(task),
        "Say the instruction below in other words. Its meaning and every requirement in it must stay the same.",
        _REPLY_FORMAT,
    ]
    lines = fixed[:3] + [f"Instruction:\n{prompt}"] + fixed[3:]
    return _meta("paraphrase", lines, fixed)


def paraphrase_phrase(task: Task, phrase: str) -> MetaPrompt:
    """GrIPS's paraphrase edit: one chunk of an instruction in other words."""
    fixed = [
        "You paraphrase parts of instructions that are given to a language model.",
        "Say the phrase below in other words. Keep its meaning and keep it about as short.",
        _REPLY_FORMAT.replace("instruction", "phrase"),
    ]
    lines = fixed[:2] + [f"Phrase:\n{phrase}"] + fixed[2:]
    return MetaPrompt(stage="grips_paraphrase", messages=[{"role": "user", "content": "\n\n".join(lines)}],
                      echo_fragments=fixed)


def with_examples(task: Task, instruction: str, examples: list[Example]) -> str:
    """The few-shot baseline: the instruction followed by solved train examples."""
    shown = [f"{render_inputs(task, example)}\nAnswer: {ANSWER_OPEN}{example.target}{ANSWER_CLOSE}" for example in examples]
    return instruction.strip() + "\n\nExamples:\n\n" + "\n\n".join(shown)


def meta_prompt_texts(task: Task) -> dict[str, str]:
    """The meta-prompts with placeholders, for a record of what the method asks."""
    placeholder = "{instruction}"
    example = Example(index=0, inputs={c: "{" + c + "}" for c in task.input_columns}, target="{answer}")
    return {
        "rewrite": rewrite(task, placeholder, 0.0, "score").messages[0]["content"].replace("0.000", "{score}"),
        "distill": distill(task, placeholder, [example]).messages[0]["content"],
        "compress": compress(task, placeholder).messages[0]["content"],
        "aggregate": aggregate(task, [placeholder + "_1", placeholder + "_2"]).messages[0]["content"],
        "paraphrase": paraphrase(task, placeholder).messages[0]["content"],
        "task": task_messages(task, placeholder, example)[0]["content"],
        "grips_paraphrase": paraphrase_phrase(task, "{phrase}").messages[0]["content"],
    }


def variables_problem(task: Task, prompt: str) -> str | None:
    """For a template task: ``variable_dropped`` or ``variable_invented`` when the prompt's
    placeholders are not exactly the template's (the app could not fill it in)."""
    if task.template_variables is None:
        return None
    found, wanted = placeholders(prompt), set(task.template_variables)
    if wanted - found:
        return "variable_dropped"
    if found - wanted:
        return "variable_invented"
    return None
