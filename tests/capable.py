"""Replies in the style of a capable optimizer model (GPT-4o-mini class, 7B+ open models).

Such a model answers a meta-prompt with a long, structured instruction: a role line, a task
line, a heading, two to six bullet or numbered rules, sometimes a quote of its own, an
output-format line that names the answer tags; 400 to 1,100 characters. It tags the
prompt, and sometimes introduces it with one line or wraps it in a code fence. Every reply
here is distinct (stage, sample and the quoted instruction decide it), and ``intended``
records the prompt each reply carries, so tests can compare candidates with it.
"""

from __future__ import annotations

import re
from typing import Any

from tests.endpoint import digest

ROLES = [
    "You are an experienced film critic who reads reviews for a living.",
    "You are a careful annotator of customer and critic reviews.",
    "You are a sentiment analyst working on short English reviews.",
    "You are an assistant that labels the opinion expressed in a review.",
]
TASKS = [
    "Your task is to decide whether the review below expresses a positive or a negative overall sentiment.",
    "Read the review and classify the writer's overall opinion of the work as positive or negative.",
    "Determine the polarity of the review: does the author recommend the work or not?",
]
HEADINGS = [
    "Guidelines:",
    "### Instructions",
    "Lessons from the examples:",
    "Key patterns observed in the examples:",
    "Lessons from the labelled examples:",
    "## How to decide",
]
RULES = [
    "Focus on the overall sentiment, not on individual plot details.",
    "Weigh the words that carry emotion (\"delightful\", \"tedious\") more than neutral description.",
    "When praise and criticism are mixed, let the final judgement of the writer decide the tone.",
    "Treat sarcasm (\"great, another sequel\") as negative even when the words look positive.",
    "Ignore the reviewer's comments about the price or the cinema; judge the opinion of the work itself.",
    "A review that recommends the work is positive even if it names small flaws.",
    "Consider the attitude of the writer toward the film as a whole.",
    "Do not let a single strong word outweigh the feeling of the whole text.",
]
FORMATS = [
    "Output format: reply with exactly one label, positive or negative, written as <ans>label</ans>.",
    "Output format: first think briefly about the evidence, then give the label inside <ans></ans> tags.",
    "Answer with a single word inside <ans> and </ans>: positive or negative.",
]
WRAPPINGS = ["plain", "intro", "fence", "intro_inside", "fence_outside", "chatter_after"]


def structured_prompt(*parts: Any) -> str:
    """A structured instruction, different for each ``parts``."""
    pick = lambda options, salt: options[digest(*parts, salt) % len(options)]  # noqa: E731
    count = 2 + digest(*parts, "count") % 5  # 2 to 6 rules
    start = digest(*parts, "rules") % len(RULES)
    rules = [RULES[(start + i) % len(RULES)] for i in range(count)]
    numbered = digest(*parts, "numbered") % 2 == 0
    lines = [f"{i}. {rule}" if numbered else f"- {rule}" for i, rule in enumerate(rules, 1)]
    # a sub-rule indented under the first one: nested lists keep their indentation
    lines.insert(1, "   - If the review is only a plot summary, look at the adjectives it uses.")
    return "\n".join(
        [pick(ROLES, "role"), pick(TASKS, "task"), "", pick(HEADINGS, "heading"), *lines, "", pick(FORMATS, "format")]
    )


def wrap(prompt: str, style: str) -> str:
    if style == "intro":
        return f"Here is an improved instruction:\n<START>\n{prompt}\n<END>"
    if style == "fence":
        return f"<START>\n```\n{prompt}\n```\n<END>"
    if style == "intro_inside":
        return f"<START>\nHere is the revised instruction:\n\n{prompt}\n<END>"
    if style == "fence_outside":
        return f"```markdown\n<START>\n{prompt}\n<END>\n```"
    if style == "chatter_after":
        return f"<START>\n{prompt}\n<END>\n\nThis version names the output format explicitly and adds rules for mixed reviews."
    return f"<START>\n{prompt}\n<END>"


class CapableModel:
    """A responder for ``ScriptedEndpoint``: meta-prompts get structured prompts (every
    wrapping style in turn); scoring requests get the endpoint's default answer, or, when
    ``reasoning`` is set and the instruction asks to think first, a short reasoning that
    ends in the tagged label."""

    def __init__(self, reasoning: bool = False) -> None:
        self.intended: dict[str, str] = {}  # reply -> the prompt it carries
        self.replies = 0
        self.reasoning = reasoning

    def __call__(self, request: dict[str, Any], kind: str, stage: str) -> str | None:
        content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
        if kind == "meta" and stage != "grips_paraphrase":
            sample = request.get("_sample", 0)
            prompt = structured_prompt(stage, sample, content)
            style = WRAPPINGS[self.replies % len(WRAPPINGS)]
            self.replies += 1
            reply = wrap(prompt, style)
            self.intended[reply] = prompt
            return reply
        if kind == "scoring" and self.reasoning and "think" in content.split("Possible answers:")[0].lower():
            from tests.endpoint import answer_scoring

            label = re.sub(r"</?ans>", "", answer_scoring(content))
            return (
                "The review describes the film with several evaluative words. Weighing the praise against the "
                f"criticism, the overall attitude of the writer is clear.\n<ans>{label}</ans>"
            )
        return None
