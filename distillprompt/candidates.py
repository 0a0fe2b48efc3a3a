"""Candidate hygiene: from a meta-prompt reply to a usable prompt, or a reason to drop it.

The optimizer model is usually a capable one, and its reply is then a long, structured
instruction: a role line, headings, bullet or numbered rules, an output-format line (answer
tags included). All of that is the candidate and is kept as written. Cleaning removes only
what is not the prompt: a surrounding code fence, one introducing line ("Here is an
improved instruction:"), and text that repeats the meta-prompt (its instructions, its
section labels, the score line, the pasted examples), which small models produce often; a
small model may also drop one of the ``<START>``/``<END>`` tags or chat around a quoted
answer. A reply is dropped, and counted by reason, when nothing is left (``empty``,
``echo``), when it still carries ``<START>``/``<END>`` tags (``tags``), when it loops
(``repetition``), or beyond an absolute length that no real prompt reaches (``too_long``):
length is never judged against the parent prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .metrics import normalize
from .templates import MetaPrompt

START_TAG = re.compile(r"<\s*start\s*>", re.IGNORECASE)
END_TAG = re.compile(r"<\s*/?\s*end\s*>", re.IGNORECASE)
# Tags of the meta-prompt's reply format; a prompt may well carry answer tags (<ans>…</ans>).
META_TAG = re.compile(r"<\s*/?\s*(start|end)\s*>", re.IGNORECASE)
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
# One line that introduces the reply ("Here is an improved instruction:", "The revised prompt:"),
# as opposed to a heading of the prompt itself ("Instructions:", "Output format:").
PREAMBLE = re.compile(
    r"^\s*((sure|certainly|of course|okay|ok|here('s| is| are)\b)[^\n]*"
    r"|(\S+\s+){0,5}(example|instruction|prompt|version|rewrite|paraphrase|output|result)s?(\s+\S+){0,3})\s*:\s*$",
    re.IGNORECASE,
)
INTRODUCING = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok|here|below)\b"
    r"|\b(here|below|following|new|rewritten|improved|alternative|revised|paraphrased|compressed|merged|condensed"
    r"|combined|refined|updated|shorter|final|better|version|edit)\b",
    re.IGNORECASE,
)
FENCE = re.compile(r"^```[\w+-]*[ \t]*\n(?P<body>.*?)\n?[ \t]*```$", re.DOTALL)
HEADING = re.compile(r"^\s*(#{1,6}\s+\S.*|[^\n:]{1,60}:)\s*$")
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
LIST_MARKER = re.compile(r"\s*(\d{1,3}[.)]|[-*\u2022])\s*")
# A sentence that borrows a run of this many words from the meta-prompt's own instructions,
# and is mostly made of such runs, repeats it in other framing: "Make sure to state the
# general rules that tell the answers apart." (a 1.5B model's distilled candidate, which won
# its round on sst5 seed 2 with that line in it). In the real-model benchmark's first runs it
# took 2 of 254 distinct sentences, both such lines (benchmarks/echo_scan.py).
ECHO_RUN = 6


@dataclass(frozen=True)
class Extraction:
    prompt: str | None
    reason: str | None  # why it was dropped: empty, echo, tags, repetition, too_long


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


def _is_introduction(line: str) -> bool:
    return bool(LABEL_LINE.match(line) or (PREAMBLE.match(line) and INTRODUCING.search(line)))


def _strip_wrapping(text: str) -> str:
    """Without one introducing line, a surrounding code fence and surrounding quotes."""
    text = text.strip()
    first, _, rest = text.partition("\n")
    if rest.strip() and _is_introduction(first):
        text = rest.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group("body").strip()
    elif text.startswith("```") and "```" not in text[3:]:  # an opening fence the reply never closed
        text = text.partition("\n")[2].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" and text.count(text[0]) == 2:
        text = text[1:-1].strip()
    return text


class EchoFilter:
    """Recognises sentences that repeat a meta-prompt instead of stating a new prompt."""

    def __init__(self, meta: MetaPrompt) -> None:
        shown = [*meta.echo_fragments, *meta.data_fragments]
        self.fragments = [normalize(fragment) for fragment in shown if normalize(fragment)]
        self.fragment_sentences = {
            normalize(sentence)
            for fragment in shown
            for sentence in SENTENCE.split(fragment)
            if len(normalize(sentence).split()) >= 3
        }
        self.examples = [normalize(text) for text in meta.example_texts if len(normalize(text)) >= 12]
        self.runs = {
            tuple(words[i : i + ECHO_RUN])
            for words in (normalize(fragment).split() for fragment in meta.echo_fragments)
            for i in range(len(words) - ECHO_RUN + 1)
        }

    def borrowed(self, words: list[str]) -> int:
        """How many of the words belong to a run of ECHO_RUN words found in the meta-prompt."""
        covered = [False] * len(words)
        for i in range(len(words) - ECHO_RUN + 1):
            if tuple(words[i : i + ECHO_RUN]) in self.runs:
                covered[i : i + ECHO_RUN] = [True] * ECHO_RUN
        return sum(covered)

    def mostly_borrowed(self, words: list[str]) -> bool:
        """The run rule: at least half of the words belong to runs of the meta-prompt's own
        instructions (a line of them reworded around its words)."""
        return 2 * self.borrowed(words) >= len(words) > 0

    def is_echo(self, sentence: str) -> bool:
        norm = normalize(sentence)
        if not norm:
            return False
        if SCORE_LINE.search(sentence):
            return True
        if norm in self.fragment_sentences:
            return True
        words = norm.split()
        if len(words) >= 4 and any(norm in fragment for fragment in self.fragments):
            return True
        if self.mostly_borrowed(words):
            return True
        return any(example in norm for example in self.examples)


def clean(text: str, meta: MetaPrompt) -> str:
    """The prompt in a reply, its layout kept: a line with nothing of the meta-prompt in it is
    kept exactly as written; echoed sentences are taken out of their line; the meta-prompt's
    own section labels go, and so does a heading whose whole section was echo."""
    echo = EchoFilter(meta)
    lines = _strip_wrapping(text).splitlines()
    kept: list[str | None] = []  # None: a line removed as echo
    for line in lines:
        if not any(kept) and not line.strip():
            continue  # blank lines before the prompt starts
        if LABEL_LINE.match(line) or (meta.example_texts and EXAMPLE_LINE.match(line)):
            kept.append(None)
            continue
        if not any(kept) and _is_introduction(line):
            continue  # an introducing line before the prompt
        sentences = [s for s in SENTENCE.split(line) if s.strip()]
        survivors = [s for s in sentences if not echo.is_echo(s)]
        if len(survivors) < len(sentences) and all(LIST_MARKER.fullmatch(s) for s in survivors):
            survivors = []  # "3." is all that is left of an echoed list item
        if len(survivors) == len(sentences):
            kept.append(line.rstrip())
        elif survivors:
            indent = line[: len(line) - len(line.lstrip())]
            kept.append(indent + " ".join(s.strip() for s in survivors))
        else:
            kept.append(None)
    result = _drop_emptied_headings(kept)
    result = re.sub(r"\n{3,}", "\n\n", "\n".join(result)).strip()
    return LEADING_LABEL.sub("", result, count=1).strip()


def _drop_emptied_headings(lines: list[str | None]) -> list[str]:
    """Removes a heading whose section (the lines up to the next heading or blank line) held
    only echo, and the echo itself."""
    out: list[str] = []
    for index, line in enumerate(lines):
        if line is None:
            continue
        if HEADING.match(line):
            section = []
            for following in lines[index + 1 :]:
                if following is not None and (not following.strip() or HEADING.match(following)):
                    break
                section.append(following)
            if section and all(item is None for item in section):
                continue
        out.append(line)
    return out


def is_repetitive(prompt: str) -> bool:
    """A runaway reply: the same sentence (of a few words at least) three times or more."""
    counts: dict[str, int] = {}
    for line in prompt.splitlines():
        for sentence in SENTENCE.split(line):
            norm = normalize(sentence)
            if len(norm.split()) >= 3:
                counts[norm] = counts.get(norm, 0) + 1
                if counts[norm] >= 3:
                    return True
    return False


def extract_candidate(reply: str, meta: MetaPrompt, max_length: int) -> Extraction:
    """Turns one meta-prompt reply into a candidate prompt, or says why it is dropped.

    ``max_length`` is an absolute bound in characters (0: none)."""
    raw = extract_tagged(reply)
    if raw == (reply or "").strip():  # no tag: the model may have chatted around a quoted answer
        raw = quoted_answer(raw) or raw
    if not _strip_wrapping(raw):
        return Extraction(None, "empty")
    prompt = clean(raw, meta)
    if not prompt:
        return Extraction(None, "echo")
    if META_TAG.search(prompt):
        return Extraction(None, "tags")
    if is_repetitive(prompt):
        return Extraction(None, "repetition")
    if max_length and len(prompt) > max_length:
        return Extraction(None, "too_long")
    return Extraction(prompt, None)
