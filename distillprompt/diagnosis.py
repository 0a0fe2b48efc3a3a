"""Whether a round had anything to learn from, told from the scores it already computed.

No request is made here. A round has no signal when its candidates cannot be told apart:

* ``flat_scores``: every candidate of the round (and the best so far) is within one
  example's worth of the best, in accuracy for classification (one answer more or less) or
  in the metric for generation (1 / train size);
* ``constant_answer``: under every candidate the target gives (nearly) the same answer to
  every input, more often than that answer is right: it ignores the instruction;
* ``ceiling``: the best prompt already answers every train example right (within one).

A run that keeps meeting such rounds spends its budget for nothing; the optimizer stops it
after the second one in a row (``--stop-when-flat``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .state import Candidate, dedup_key

CONSTANT_SHARE = 0.9  # the most common answer's share that makes an answer "near-constant"
UNPARSED = "(unparsed)"
ADVICE = "try a larger target model, a larger train sample or a different initial prompt"


@dataclass
class RoundDiagnosis:
    round: int
    candidates: int  # scored candidates compared: the round's distinct new ones and the best
    score_low: float
    score_high: float
    one_example: float  # the score one example is worth
    parse_rate: float  # mean over the compared candidates
    top_answer: str | None  # the target's most common answer under the best candidate
    top_answer_count: int
    inputs: int
    top_answer_share_min: float  # the most common answer's share, under the candidate where it is smallest
    gold: dict[str, int] = field(default_factory=dict)  # label counts of the train sample
    copies: dict[str, int] = field(default_factory=dict)  # candidates that repeat their parent, by stage
    reason: str | None = None  # flat_scores, constant_answer or ceiling; None: the round had signal
    sentence: str | None = None

    @property
    def flat(self) -> bool:
        return self.reason is not None

    @property
    def spread(self) -> float:
        return self.score_high - self.score_low

    def metrics(self) -> dict[str, float]:
        """Per-round MLflow metrics."""
        found = {
            "score_spread": self.spread,
            "top_answer_share": self.top_answer_share_min,
            "flat_round": float(self.flat),
            "copies": float(sum(self.copies.values())),
        }
        found.update({f"copies_{stage}": float(count) for stage, count in self.copies.items()})
        return found

    def summary(self) -> str:
        """The short form for the round's summary line."""
        parts = [f"spread {self.spread:.4f}", f"parse {self.parse_rate:.2f}"]
        if self.top_answer is not None:
            gold = self.gold.get(self.top_answer, 0)
            parts.append(f"answers {self.top_answer!r} {self.top_answer_count}/{self.inputs} (gold {gold})")
        copies = ", ".join(f"{stage} {count}" for stage, count in self.copies.items() if count)
        if copies:
            parts.append(f"copies {copies}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flat": self.flat, "spread": self.spread}


def answer_counts(predictions: list[str | None]) -> dict[str, int]:
    return dict(Counter(UNPARSED if p is None else p for p in predictions))


def is_copy(candidate: Candidate, history: list[Candidate]) -> bool:
    """A candidate that says what one of its parents said (white space aside)."""
    key = dedup_key(candidate.prompt)
    return any(dedup_key(history[parent].prompt) == key for parent in candidate.parents)


def diagnose(
    number: int,
    new: list[Candidate],
    best: Candidate,
    history: list[Candidate],
    gold: list[str],
    classification: bool,
) -> RoundDiagnosis:
    distinct = [c for c in new if c.duplicate_of is None and c.score is not None]
    compared = [best, *[c for c in distinct if c.id != best.id]]
    inputs = len(gold)
    one_example = 1.0 / inputs if inputs else 0.0

    def value(candidate: Candidate) -> float:
        if classification:
            return candidate.metrics.get("accuracy", candidate.score or 0.0)
        return candidate.score or 0.0

    values = [value(c) for c in compared]
    copies: dict[str, int] = {}
    for candidate in new:
        copies.setdefault(candidate.stage, 0)
        if is_copy(candidate, history):
            copies[candidate.stage] += 1
    top_answer, top_count, share_min = None, 0, 0.0
    gold_counts = dict(Counter(gold)) if classification else {}
    if classification and all(c.answers for c in compared):
        top_answer, top_count = Counter(best.answers).most_common(1)[0]
        share_min = min(max(c.answers.values()) / max(1, sum(c.answers.values())) for c in compared)
    diagnosis = RoundDiagnosis(
        round=number,
        candidates=len(compared),
        score_low=min(values),
        score_high=max(values),
        one_example=one_example,
        parse_rate=sum(c.parse_rate or 0.0 for c in compared) / len(compared),
        top_answer=top_answer,
        top_answer_count=top_count,
        inputs=inputs,
        top_answer_share_min=share_min,
        gold=gold_counts,
        copies=copies,
    )
    _judge(diagnosis, len(distinct))
    return diagnosis


def _judge(d: RoundDiagnosis, new_scored: int) -> None:
    if not new_scored or d.candidates < 2:
        return  # nothing to compare (every reply dropped or a duplicate, or a method that does not search)
    tolerance = d.one_example + 1e-9
    majority = max(d.gold.values()) / d.inputs if d.gold and d.inputs else 0.0
    # near-constant under every candidate, and more constant than the labels themselves are
    constant = (
        d.top_answer is not None
        and d.top_answer_share_min >= CONSTANT_SHARE
        and d.top_answer_share_min > majority + tolerance
    )
    answered = (
        f"the target answered {d.top_answer!r} to {d.top_answer_count} of {d.inputs} inputs "
        f"({d.gold.get(d.top_answer, 0)} have that label)"
        if d.top_answer is not None
        else ""
    )
    if constant:
        d.reason = "constant_answer"
        d.sentence = (
            f"Round {d.round} shows no signal: under every one of its {d.candidates} candidates {answered}, so the "
            f"target model ignores the instruction; {ADVICE}."
        )
    elif d.score_high >= 1.0 - tolerance and d.spread <= tolerance:
        d.reason = "ceiling"
        d.sentence = (
            f"Round {d.round} shows no signal: every candidate answers (nearly) every train example right, so there "
            "is nothing left to learn on this sample; use a larger or harder train sample."
        )
    elif d.spread <= tolerance:
        d.reason = "flat_scores"
        unit = "accuracy" if d.gold else "score"
        d.sentence = (
            f"Round {d.round} shows no signal: all {d.candidates} candidates scored within one example of each "
            f"other ({unit} {d.score_low:.4f} to {d.score_high:.4f})"
            + (f" and {answered}" if answered else "")
            + f"; the target model does not respond to the instruction; {ADVICE}."
        )
