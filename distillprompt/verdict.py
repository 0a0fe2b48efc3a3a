"""Did the final prompt beat the initial one on the test sample? One honest sentence.

The two prompts answered the same test examples, so the comparison is paired: the examples
are resampled with both answers (a bootstrap) and the run's metric is counted again on each
resample (``paired.paired_interval``): macro-F1 for classification, whose gain can be far
larger than accuracy's when a prompt fixes a lean to one label. A gain counts only when the
whole 95% interval of the metric's difference lies above zero. For classification the
interval of accuracy's difference is given beside it. The verdict goes into the run's
summary, its MLflow description and the registered prompt's tags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .paired import label_codes, paired_interval, record_of

BETTER = "better"  # higher test score, interval above zero
WITHIN_NOISE = "within_noise"  # higher test score, interval includes zero
NOT_BETTER = "not_better"  # same or lower test score
KEPT_INITIAL = "kept_initial"  # no candidate won: the final prompt is the initial one
UNKNOWN = "unknown"  # the test sample was not scored (the endpoint gave up)

ADVICE = (
    "for a real gain try a stronger optimizer or target model (a real endpoint), a larger train sample, "
    "a validation sample (--val-size) or a different initial prompt"
)


def score_interval(before: Any, after: Any, labels: list[str] | None, seed: int = 0) -> tuple[float, float, float]:
    """The metric's difference between two ``Score``s of the same examples (after − before)
    and its paired 95% bootstrap interval; ``labels`` for classification (macro-F1), None
    for a metric that is a mean over examples."""
    targets = label_codes(labels, before.targets) if labels is not None else None
    return paired_interval(record_of(before, labels), record_of(after, labels), targets,
                           len(labels) if labels is not None else None, seed)


@dataclass(frozen=True)
class Verdict:
    outcome: str
    metric: str
    examples: int
    initial_score: float | None
    final_score: float | None
    difference: float  # the metric's difference, final − initial
    low: float  # its paired 95% bootstrap interval
    high: float
    sentence: str
    # classification: accuracy's difference and interval, beside the metric's
    accuracy_difference: float | None = None
    accuracy_low: float | None = None
    accuracy_high: float | None = None

    @property
    def beat_initial(self) -> bool:
        return self.outcome == BETTER

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "beat_initial": self.beat_initial}


def judge(
    *,
    metric: str,
    labels: list[str] | None,
    kept_initial: bool,
    initial_test: Any,
    final_test: Any,
    seed: int = 0,
) -> Verdict:
    """The verdict on a run from its initial and final test ``Score``s (None: not scored)."""
    if initial_test is None or final_test is None:
        return Verdict(UNKNOWN, metric, 0, None, None, 0.0, 0.0, 0.0,
                       "The test sample was not scored, so whether the final prompt is better is unknown.")
    count = len(final_test.per_example)
    before, after = initial_test.value, final_test.value
    difference, low, high = score_interval(initial_test, final_test, labels, seed)
    scores = f"test {metric} {before:.4f} → {after:.4f}"
    interval = f"paired 95% bootstrap interval of the {metric} difference {low:+.4f} to {high:+.4f}"
    accuracy: tuple[float, float, float] | None = None
    beside = ""
    if labels is not None:
        accuracy = score_interval(initial_test, final_test, None, seed)
        beside = f"; accuracy {accuracy[0]:+.4f}, interval {accuracy[1]:+.4f} to {accuracy[2]:+.4f}"
    if kept_initial:
        outcome = KEPT_INITIAL
        sentence = (
            f"No candidate beat the initial prompt during the search, so the run kept it ({scores.split(' →')[0]}); "
            f"{ADVICE}."
        )
    elif after > before and low > 0:
        outcome = BETTER
        sentence = f"The final prompt beat the initial one on the {count} test examples: {scores}, {interval}{beside}."
    elif after > before:
        outcome = WITHIN_NOISE
        sentence = (
            f"The final prompt scored higher on the {count} test examples ({scores}), but the gain is within the "
            f"noise ({interval} includes zero{beside}); a larger test sample would tell."
        )
    else:
        outcome = NOT_BETTER
        sentence = (
            f"The final prompt did not beat the initial one on the {count} test examples ({scores}; {interval}{beside}): "
            f"keep the initial prompt; {ADVICE}."
        )
    return Verdict(outcome, metric, count, before, after, difference, low, high, sentence, *(accuracy or (None,) * 3))

