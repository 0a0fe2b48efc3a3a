"""Two prompts compared on the same examples, on the metric the run selects by.

What a prompt answered on a list of examples is its *record*: for a classification task
the label it predicted on each example (as the label's position in the task's labels, -1
for an answer that names none), for a generation task the metric of each answer. The
metric is counted from records: macro-F1 over the predicted and true labels (it is not a
mean over examples, so a prompt that fixes a lean to one label gains far more in it than
in accuracy), the mean for generation.

Both comparisons here are paired, as the two prompts answered the very same examples:

* ``is_worse``, the race's test: a one-sided paired permutation test of the metric's
  difference (each example's two answers are swapped at random; SciPy's
  ``permutation_test``, exact when the examples are few).
* ``paired_interval``, the verdict's and ``compare``'s interval: a paired bootstrap
  (examples resampled with both answers, the metric counted again on each resample).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
PERMUTATIONS = 2000  # exact below 11 examples (2**n <= PERMUTATIONS), random draws above
UNPARSED = -1


def label_codes(labels: Sequence[str], values: Sequence[str | None]) -> list[int]:
    """Each label's position in ``labels`` (-1: unparsed, or not one of them)."""
    position = {label: i for i, label in enumerate(labels)}
    return [position.get(value, UNPARSED) if value is not None else UNPARSED for value in values]


def record_of(score: Any, labels: Sequence[str] | None) -> list[float]:
    """A ``Score``'s record: predicted label codes (classification) or per-example values."""
    if labels is None:
        return [float(value) for value in score.per_example]
    return [float(code) for code in label_codes(labels, score.predictions)]


def metric_of(records: np.ndarray, targets: np.ndarray | None, label_count: int | None) -> np.ndarray:
    """The metric of records along the last axis: macro-F1 over ``label_count`` labels
    (targets as label codes, broadcast against the records; scikit-learn's formula with
    ``zero_division=0``, as ``metrics.classification_scores``), or the mean."""
    if label_count is None:
        return records.mean(axis=-1)
    total = np.zeros(np.broadcast_shapes(records.shape, targets.shape)[:-1])
    for label in range(label_count):
        predicted = records == label
        true = targets == label
        hits = (predicted & true).sum(axis=-1)
        denominator = predicted.sum(axis=-1) + true.sum(axis=-1)
        total = total + np.where(denominator > 0, 2 * hits / np.maximum(denominator, 1), 0.0)
    return total / label_count


def is_worse(
    candidate: Sequence[float], incumbent: Sequence[float], targets: Sequence[float] | None,
    label_count: int | None, alpha: float,
) -> bool:
    """Whether a one-sided paired permutation test says the candidate's metric on these
    examples is lower than the incumbent's, at level ``alpha``. Identical records are no
    evidence either way; the draws are seeded, so a rerun decides the same."""
    from scipy.stats import permutation_test

    mine, theirs = np.asarray(candidate, dtype=float), np.asarray(incumbent, dtype=float)
    if mine.size < 2 or np.array_equal(mine, theirs):
        return False
    truth = None if targets is None else np.asarray(targets, dtype=float)

    def difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return metric_of(a, truth, label_count) - metric_of(b, truth, label_count)

    if difference(mine, theirs) >= 0:
        # swapping the two answers of an example is as likely as not under the null, so the
        # difference's distribution is symmetric about 0: a difference that is not below 0
        # has a p-value of at least 1/2 (and the test, milliseconds, is not needed)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = permutation_test(
            (mine, theirs), difference, permutation_type="samples", vectorized=True, n_resamples=PERMUTATIONS,
            alternative="less", random_state=0,
        )
    p_value = float(result.pvalue)
    return not math.isnan(p_value) and p_value < alpha


def paired_interval(
    before: Sequence[float], after: Sequence[float], targets: Sequence[float] | None = None,
    label_count: int | None = None, seed: int = 0,
) -> tuple[float, float, float]:
    """The metric's difference after − before on the same examples, with a 95% percentile
    bootstrap interval: the examples are resampled (both records and the target together)
    and the metric is counted again on each resample. With ``label_count`` None the metric
    is the mean, and this is the bootstrap of the mean per-example difference.

    Written out rather than with SciPy's ``bootstrap``: it keeps ``scipy.stats``' import off
    the end of every run (docs/decisions.md); for the mean it is SciPy's percentile
    bootstrap step for step, and a test holds it to SciPy's numbers."""
    old, new = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    truth = None if targets is None else np.asarray(targets, dtype=float)
    if new.size == 0:
        return 0.0, 0.0, 0.0
    difference = float(metric_of(new, truth, label_count) - metric_of(old, truth, label_count))
    if np.array_equal(old, new):
        return difference, difference, difference
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, new.size, (BOOTSTRAP_SAMPLES, new.size))
    if label_count is None:
        if np.all(new - old == (new - old)[0]):
            return difference, difference, difference
        resampled = (new - old)[draws].mean(axis=-1)
    else:
        resampled = metric_of(new[draws], truth[draws], label_count) - metric_of(old[draws], truth[draws], label_count)
    alpha = (1 - 0.95) / 2
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    return difference, float(low), float(high)
