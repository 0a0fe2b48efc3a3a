"""Candidate hygiene: from a meta-prompt reply to a usable prompt, or a reason to drop it.

Small and mid-size models often drop one of the ``<START>``/``<END>`` tags, chat around
the prompt, or echo the meta-prompt: its instructions, its score line, the examples it
showed. What is left after extraction and cleaning becomes a candidate, unless it is
empty, still carries tags, or is far longer than its parents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .metrics import normalize
from .templates import MetaPrompt

START_TAG = re.compile(r"<\s*start\s*>", re.IGNORECASE)
END_TAG = re.compile(r"<\s*/?\s*end\s*>", re.IGNORECASE)
ANY_TAG = re.compile(r"<\s*/?\s*(start|end|ans)\s*>", re.IGNORECASE)
# A sentence that reports how the prompt scored: it names the prompt and a score, or gives a
# number "out of 1" / "being the maximum", as meta-prompts put it. A task rule that mentions
# a score ("a rating of 4.5 or more is positive") is not one.
SCORE_LINE = re.compile(
    r"\b(prompt|instruction)\b.{0,40}\b(scored|reached|achieved|score|f1|accuracy)\b.{0,40}?\d*\.\d+"
    r"|\d*\.\d+\s*(out of 1\b|out of 1\.0|being the max|/\s*1(\.0+)?\b)"
    r"|\bmacro[- ]?f1\b.{0,30}?\d*\.\d+",
    re.IGNORECASE,
)
LABEL_LINE = re.compile(
    r"^\s*(new |improved |final |rewritten |merged |paraphrased |compressed )?"
    r"(instruction|prompt|answer|input|examples?)( \d+)?\s*:\s*$",
    re.IGNORECASE,
)
LEADING_LABEL = re.compile(
    r"^\s*(new |improved |final |rewritten |merged |paraphrased |compressed )?(instruction|prompt)( \d+)?\s*:\s*",
    re.IGNORECASE,
)
PREAMBLE = re.compile(
    r"^\s*((sure|certainly|of course|okay|ok|here('s| is| are)\b)[^\n]*"
    r"|(\S+\s+){0,5}(example|instruction|prompt|version|rewrite|paraphrase|output|result)s?(\s+\S+){0,3})\s*:\s*$",
    re.IGNORECASE,
)
# An untagged reply that introduces its answer and then quotes it: 'Here is a new version of
# the instruction: "..."', 'The new instruction reads:\n\n"..."'. The introduction is the
# sentence right before the colon; the quote closes the reply.
QUOTED_ANSWER = re.compile(r'(?P<intro>[^\n.!?]*):\s*["\u201c](?P<quote>[^"\u201c\u201d\n]{12,})["\u201d]\s*$')
INTRO = re.compile(
    r"\b(here|below|following|new|rewritten|improved|alternative|revised|paraphrased|compressed|merged|version|edit"
    r"|instruction|prompt|text|sentence)\b",
    re.IGNORECASE,
)
EXAMPLE_LINE = re.compile(r"^\s*correct answer\s*:", re.IGNORECASE)
SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Extraction:
    prompt: str | None
    reason: str | None  # why it was dropped: empty, echo, tags, too_long


def extract_tagged(reply: str) -> str:
    """The text between <START> and <END>; a lone tag still delimits the prompt."""
    text = reply or ""
    starts = list(START_TAG.finditer(text))
    ends = list(END_TAG.finditer(text))
    if starts:
        for start in starts:
            following = [end for end in ends if end.start() >= start.end()]
            segment = text[start.end() : following[0].start()] if following else text[start.end() :]
            if segment.strip():
                return segment.strip()
        return ""
    if ends:
        return text[: ends[0].start()].strip()
    return text.strip()


def quoted_answer(text: str) -> str | None:
    """The quote that closes a reply after an introduction ending in a colon, if there is one."""
    found = QUOTED_ANSWER.search(text)
    if found and INTRO.search(found.group("intro")) and len(found.group("quote").split()) >= 3:
        return found.group("quote").strip()
    return None


def _strip_wrapping(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


class EchoFilter:
    """Recognises sentences that repeat a meta-prompt instead of stating a new prompt."""

    def __init__(self, meta: MetaPrompt) -> None:
        self.fragments = [normalize(fragment) for fragment in meta.echo_fragments if normalize(fragment)]
        self.fragment_sentences = {
            normalize(sentence)
            for fragment in meta.echo_fragments
            for sentence in SENTENCE.split(fragment)
            if len(normalize(sentence).split()) >= 3
        }
        self.examples = [normalize(text) for text in meta.example_texts if len(normalize(text)) >= 12]

    def is_echo(self, sentence: str) -> bool:
        norm = normalize(sentence)
        if not norm:
            return False
        if SCORE_LINE.search(sentence):
            return True
        if norm in self.fragment_sentences:
            return True
        if len(norm.split()) >= 4 and any(norm in fragment for fragment in self.fragments):
            return True
        return any(example in norm for example in self.examples)


def clean(text: str, meta: MetaPrompt) -> str:
    echo = EchoFilter(meta)
    kept_lines: list[str] = []
    for line in _strip_wrapping(text).splitlines():
        if LABEL_LINE.match(line) or PREAMBLE.match(line) or (meta.example_texts and EXAMPLE_LINE.match(line)):
            continue
        sentences = [s for s in SENTENCE.split(line) if s.strip() and not echo.is_echo(s)]
        kept = " ".join(s.strip() for s in sentences)
        if kept or (kept_lines and kept_lines[-1]):
            kept_lines.append(kept)
    result = "\n".join(kept_lines).strip()
    return LEADING_LABEL.sub("", result, count=1).strip()


def extract_candidate(reply: str, meta: MetaPrompt, parents: list[str], max_length_ratio: float) -> Extraction:
    """Turns one meta-prompt reply into a candidate prompt, or says why it is dropped."""
    raw = extract_tagged(reply)
    if raw == (reply or "").strip():  # no tag: the model may have chatted around a quoted answer
        raw = quoted_answer(raw) or raw
    if not _strip_wrapping(raw):
        return Extraction(None, "empty")
    prompt = clean(raw, meta)
    if not prompt:
        return Extraction(None, "echo")
    if ANY_TAG.search(prompt):
        return Extraction(None, "tags")
    longest_parent = max((len(parent) for parent in parents), default=0)
    if longest_parent and len(prompt) > max_length_ratio * longest_parent:
        return Extraction(None, "too_long")
    return Extraction(prompt, None)
