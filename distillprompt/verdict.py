"""Did the final prompt beat the initial one on the test sample? One honest sentence.

The two prompts answered the same test examples, so the comparison is paired: the
per-example differences (correctness for classification, the metric for generation) are
resampled with a bootstrap, and a gain counts only when the whole 95% interval lies above
zero. The verdict goes into the run's summary, its MLflow description and the registered
prompt's tags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BOOTSTRAP_SAMPLES = 2000

BETTER = "better"  # higher test score, interval above zero
WITHIN_NOISE = "within_noise"  # higher test score, interval includes zero
NOT_BETTER = "not_better"  # same or lower test score
KEPT_INITIAL = "kept_initial"  # no candidate won: the final prompt is the initial one
UNKNOWN = "unknown"  # the test sample was not scored (the endpoint gave up)

ADVICE = (
    "for a real gain try a stronger optimizer or target model (a real endpoint), a larger train sample, "
    "a validation sample (--val-size) or a different initial prompt"
)


def paired_bootstrap(before: list[float], after: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of after − before per example, with a 95% percentile bootstrap interval.

    The resampling is SciPy's ``bootstrap(method="percentile")`` step for step (one batch of
    index draws from ``default_rng(seed)``, the mean of each resample, linear quantiles), and
    a test holds it to SciPy's numbers; it is written out here to keep ``scipy.stats``' import
    off the end of every run (docs/decisions.md). Identical differences (a prompt compared
    with itself, or a flat sample) have a zero-width interval."""
    import numpy as np

    differences = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if differences.size == 0:
        return 0.0, 0.0, 0.0
    mean = float(differences.mean())
    if np.all(differences == differences[0]):
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, differences.size, (BOOTSTRAP_SAMPLES, differences.size))
    means = differences[draws].mean(axis=-1)
    alpha = (1 - 0.95) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high)


@dataclass(frozen=True)
class Verdict:
    outcome: str
    metric: str
    examples: int
    initial_score: float | None
    final_score: float | None
    difference: float  # mean per-example difference, final − initial
    low: float
    high: float
    sentence: str

    @property
    def beat_initial(self) -> bool:
        return self.outcome == BETTER

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "beat_initial": self.beat_initial}


def judge(
    *,
    metric: str,
    classification: bool,
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
    difference, low, high = paired_bootstrap(initial_test.per_example, final_test.per_example, seed)
    per_example = "accuracy" if classification else metric
    scores = f"test {metric} {before:.4f} → {after:.4f}"
    interval = f"paired 95% interval of the per-example {per_example} difference {low:+.4f} to {high:+.4f}"
    if kept_initial:
        outcome = KEPT_INITIAL
        sentence = (
            f"No candidate beat the initial prompt during the search, so the run kept it ({scores.split(' →')[0]}); "
            f"{ADVICE}."
        )
    elif after > before and low > 0:
        outcome = BETTER
        sentence = f"The final prompt beat the initial one on the {count} test examples: {scores}, {interval}."
    elif after > before:
        outcome = WITHIN_NOISE
        sentence = (
            f"The final prompt scored higher on the {count} test examples ({scores}), but the gain is within the "
            f"noise ({interval} includes zero); a larger test sample would tell."
        )
    else:
        outcome = NOT_BETTER
        sentence = (
            f"The final prompt did not beat the initial one on the {count} test examples ({scores}; {interval}): "
            f"keep the initial prompt; {ADVICE}."
        )
    return Verdict(outcome, metric, count, before, after, difference, low, high, sentence)
