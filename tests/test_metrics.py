"""Answer parsing and scoring: distillprompt.metrics against hand-computed values."""

from __future__ import annotations

import pytest

from distillprompt import metrics
from distillprompt.errors import UserError
from distillprompt.metrics import (
    classification_scores,
    exact_match,
    final_number,
    generation_scores,
    meteor,
    numeric_match,
    parse_label,
    rouge_l,
)

SENTIMENT = ["positive", "negative"]


# ----- parse_label ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<ans>positive</ans>", "positive"),
        ("<ans>negative</ans>", "negative"),
        ("Let me think. The tone is harsh.\n<ans>negative</ans>", "negative"),
        ("< ANS >positive</ ans >", "positive"),  # tag spacing and case are forgiven
    ],
)
def test_parse_label_reads_answer_tags(reply: str, expected: str) -> None:
    assert parse_label(reply, SENTIMENT) == expected


def test_parse_label_forgives_missing_closing_tag() -> None:
    assert parse_label("<ans>negative", SENTIMENT) == "negative"
    assert parse_label("Reasoning first... <ans> positive", SENTIMENT) == "positive"


def test_parse_label_tag_wins_over_labels_mentioned_before_it() -> None:
    # "positive" is mentioned first in the reply, but the tagged answer is the one that counts.
    assert parse_label("It is not positive at all. <ans>negative</ans>", SENTIMENT) == "negative"


@pytest.mark.parametrize("reply", ["NEGATIVE", "Negative!!!", "<ans>  negative. </ans>", '"negative"', "**Negative**"])
def test_parse_label_ignores_case_and_punctuation(reply: str) -> None:
    assert parse_label(reply, SENTIMENT) == "negative"


def test_parse_label_returns_label_with_its_original_spelling() -> None:
    labels = ["entailment", "not_entailment"]
    # Normalisation turns "_" into a space, but the label comes back as the task spells it.
    assert parse_label("<ans>not entailment</ans>", labels) == "not_entailment"
    assert parse_label("<ans>Not_Entailment</ans>", labels) == "not_entailment"


def test_parse_label_picks_the_label_the_reasoning_ends_on() -> None:
    # an answer that reasons first names its conclusion last
    assert parse_label("Parts are negative, but the verdict is positive", SENTIMENT) == "positive"
    assert parse_label("It starts positive; overall the tone is negative.", SENTIMENT) == "negative"


def test_parse_label_prefers_longest_label_at_equal_position() -> None:
    labels = ["good", "good enough"]
    # Both labels start at position 0; the longer one is the one meant.
    assert parse_label("good enough, I think", labels) == "good enough"
    assert parse_label("good, I think", labels) == "good"
    labels = ["entailment", "not_entailment"]
    assert parse_label("The answer is not entailment.", labels) == "not_entailment"


def test_parse_label_matches_whole_words_only() -> None:
    # "positively" is not the label "positive".
    assert parse_label("positively unsure", SENTIMENT) is None


def test_parse_label_falls_back_to_whole_reply_when_tag_names_no_label() -> None:
    assert parse_label("<ans>maybe</ans> on reflection, positive", SENTIMENT) == "positive"


@pytest.mark.parametrize("reply", ["I cannot tell.", "<ans>neutral</ans>", "<ans>maybe</ans>", "42"])
def test_parse_label_unparseable_is_none(reply: str) -> None:
    assert parse_label(reply, SENTIMENT) is None


@pytest.mark.parametrize(
    "reply",
    [None, "", "   ", "\n\t", "<ans>", "</ans>", "<ans></ans>", "<ans>\n</ans>", "<<ans>>", "\x00", "🙂🙂", "x" * 20000, "<ans>" * 50],
)
def test_parse_label_never_raises_on_odd_input(reply) -> None:
    assert parse_label(reply, SENTIMENT) is None


def test_parse_label_with_no_labels_is_none() -> None:
    assert parse_label("positive", []) is None


# ----- classification_scores -----------------------------------------------------------


def test_classification_scores_two_classes_by_hand() -> None:
    targets = ["pos", "pos", "neg", "neg"]
    predictions = ["pos", "neg", "neg", None]  # the last answer could not be parsed
    scores = classification_scores(predictions, targets, ["neg", "pos"])
    # pos: TP=1 (#0), FP=0, FN=1 (#1)            -> P=1/1, R=1/2, F1=2*1*0.5/1.5 = 2/3
    # neg: TP=1 (#2), FP=1 (#1), FN=1 (#3 unparsed) -> P=1/2, R=1/2, F1=1/2
    # macro F1 = (2/3 + 1/2) / 2 = 7/12 = 0.583333...
    # accuracy = 2 correct (#0, #2) / 4 = 0.5
    assert scores["macro_f1"] == pytest.approx(0.5833333333333334)
    assert scores["accuracy"] == pytest.approx(0.5)


def test_classification_scores_unparsed_counts_as_wrong() -> None:
    targets = ["pos", "neg"]
    # Both unparsed: no class has a true positive -> F1 0 for each; accuracy 0/2.
    assert classification_scores([None, None], targets, ["neg", "pos"]) == {"macro_f1": 0.0, "accuracy": 0.0}
    # One right, one unparsed:
    # pos: TP=1, FP=0, FN=0 -> F1=1; neg: TP=0, FN=1 -> F1=0; macro=(1+0)/2=0.5; accuracy=1/2=0.5
    scores = classification_scores(["pos", None], targets, ["neg", "pos"])
    assert scores["macro_f1"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(0.5)


def test_classification_scores_agree_with_scikit_learn() -> None:
    """The counts replace scikit-learn's f1_score on the hot path; they must give its numbers,
    labels that are never predicted or never true included."""
    import random

    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(7)
    for trial in range(300):
        labels = ["a", "b", "c", "d", "e"][: rng.randint(2, 5)]
        size = rng.randint(1, 40)
        targets = [rng.choice(labels[: rng.randint(1, len(labels))]) for _ in range(size)]
        predictions = [rng.choice([*labels, None]) for _ in range(size)]
        ours = classification_scores(predictions, targets, labels)
        unparsed = [p if p is not None else "\x00unparsed" for p in predictions]
        expected = f1_score(targets, unparsed, labels=labels, average="macro", zero_division=0)
        assert ours["macro_f1"] == pytest.approx(float(expected), abs=1e-12), (trial, targets, predictions)
        assert ours["accuracy"] == pytest.approx(float(accuracy_score(targets, unparsed)), abs=1e-12)


def test_classification_scores_three_classes_by_hand() -> None:
    targets = ["a", "a", "b", "b", "c", "c"]
    predictions = ["a", "b", "b", "b", "c", None]
    scores = classification_scores(predictions, targets, ["a", "b", "c"])
    # a: TP=1, FP=0, FN=1 -> P=1, R=1/2, F1=2/3
    # b: TP=2, FP=1 (#1), FN=0 -> P=2/3, R=1, F1=2*(2/3)*1/(5/3)=4/5
    # c: TP=1, FP=0, FN=1 (#5 unparsed) -> P=1, R=1/2, F1=2/3
    # macro = (2/3 + 4/5 + 2/3)/3 = (10/15 + 12/15 + 10/15)/3 = 32/45 = 0.711111...
    # accuracy = 4/6 = 0.666666...
    assert scores["macro_f1"] == pytest.approx(0.7111111111111111)
    assert scores["accuracy"] == pytest.approx(0.6666666666666666)


def test_classification_scores_perfect_and_empty() -> None:
    assert classification_scores(["a", "b"], ["a", "b"], ["a", "b"]) == {"macro_f1": 1.0, "accuracy": 1.0}
    assert classification_scores([], [], ["a", "b"]) == {"macro_f1": 0.0, "accuracy": 0.0}


# ----- rouge_l, exact_match ------------------------------------------------------------


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens
    # P = 5/6, R = 5/6 -> F = 5/6 = 0.833333...
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8333333333333334)
    # LCS("a b c d", "a c") = 2; P = 2/4 = 0.5, R = 2/2 = 1; F = 2*0.5*1/1.5 = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(0.6666666666666666)
    # Order matters: LCS("c b a", "a b c") = 1; P = R = 1/3 -> F = 1/3
    assert rouge_l("c b a", "a b c") == pytest.approx(0.3333333333333333)


def test_rouge_l_edges() -> None:
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)  # case/punctuation ignored
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "cat") == 0.0
    assert rouge_l("cat", "") == 0.0
    assert rouge_l("!!!", "cat") == 0.0


def test_exact_match() -> None:
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("  The  Eiffel   Tower ", "the eiffel tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "Paris") == 0.0


# ----- final_number, numeric_match -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1,234", 1234.0),
        ("so she pays 18 dollars.\n#### 18", 18.0),
        ("The answer is -12.5", -12.5),
        ("It drops to -7 degrees", -7.0),
        ("costs 3 apples and 4.25 dollars", 4.25),  # the last number counts
        ("total: 1,234.56", 1234.56),
        ("about .5 of it", 0.5),
        ("a loss of -.25", -0.25),
        ("The answer is 5. Done", 5.0),
    ],
)
def test_final_number(text: str, expected: float) -> None:
    assert final_number(text) == expected


@pytest.mark.parametrize("text", ["no numbers here", "", None, "-", "...", ","])
def test_final_number_none(text) -> None:
    assert final_number(text) is None


def test_numeric_match() -> None:
    assert numeric_match("so the total is 1234", "#### 1,234") == 1.0
    assert numeric_match("<ans>1,234</ans>", "#### 1234") == 1.0
    assert numeric_match("42.0", "42") == 1.0
    assert numeric_match("-3.5", "#### -3.5") == 1.0
    assert numeric_match("-7", "7") == 0.0  # the sign matters
    assert numeric_match("1233", "#### 1,234") == 0.0
    assert numeric_match("no idea", "#### 5") == 0.0
    assert numeric_match("5", "no number") == 0.0


# ----- meteor --------------------------------------------------------------------------


def test_meteor_identical_is_near_one() -> None:
    score = meteor("the cat sat on the mat", "the cat sat on the mat")
    assert 0.99 < score <= 1.0


def test_meteor_disjoint_is_zero() -> None:
    assert meteor("dog runs fast", "the cat sleeps") == 0.0
    assert meteor("", "the cat sleeps") == 0.0


@pytest.mark.parametrize(
    ("synonym", "unrelated", "reference"),
    [
        ("the red car stopped", "the red tree stopped", "the red auto stopped"),
        ("a quick answer", "a green answer", "a fast answer"),
    ],
)
def test_meteor_rewards_wordnet_synonyms(synonym: str, unrelated: str, reference: str) -> None:
    # car/auto and quick/fast share a WordNet synset; tree/green share none with the reference word.
    with_synonym, with_unrelated = meteor(synonym, reference), meteor(unrelated, reference)
    assert with_synonym > with_unrelated
    assert with_synonym > 0.9


def test_meteor_without_wordnet_raises_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import nltk

    def not_found(*args, **kwargs):
        raise LookupError("no wordnet in the nltk data path")

    monkeypatch.setattr(metrics, "DEBIAN_WORDNET", tmp_path / "missing-wordnet")
    monkeypatch.setattr(nltk.data, "find", not_found)
    metrics.wordnet.cache_clear()
    try:
        with pytest.raises(UserError) as raised:
            meteor("the cat sat", "the cat sat")
        message = str(raised.value)
        assert "apt-get install wordnet-base" in message
        assert "\n" not in message
    finally:
        metrics.wordnet.cache_clear()  # later tests load the real WordNet again


# ----- generation_scores ---------------------------------------------------------------


def test_generation_scores_returns_means_and_per_example() -> None:
    answers = ["the cat sat on the mat", "so it is 42"]
    references = ["the cat is on the mat", "#### 42"]
    means, per_example = generation_scores(answers, references, "numeric")
    # numeric: #0 has no number -> 0.0; #1 42 == 42 -> 1.0; mean 0.5
    # rouge_l: #0 = 5/6 (see above); #1 LCS("so it is 42", "42") = 1, P=1/4, R=1 -> F=2*0.25/1.25=0.4
    #          mean = (5/6 + 0.4)/2 = 0.616666...
    # exact_match: 0, 0 -> 0.0
    assert set(means) == {"numeric", "rouge_l", "exact_match"}
    assert means["numeric"] == pytest.approx(0.5)
    assert means["rouge_l"] == pytest.approx(0.6166666666666667)
    assert means["exact_match"] == 0.0
    assert per_example == [0.0, 1.0]


def test_generation_scores_chosen_metric_not_duplicated() -> None:
    means, per_example = generation_scores(["a b c d", "Paris"], ["a c", "paris"], "rouge_l")
    # rouge_l: 2/3 (see above) and 1.0 -> mean (2/3 + 1)/2 = 5/6; exact_match: 0, 1 -> 0.5
    assert set(means) == {"rouge_l", "exact_match"}
    assert means["rouge_l"] == pytest.approx(0.8333333333333334)
    assert means["exact_match"] == pytest.approx(0.5)
    assert per_example == pytest.approx([0.6666666666666666, 1.0])


def test_generation_scores_meteor_per_example() -> None:
    means, per_example = generation_scores(["the cat sat on the mat", "dog"], ["the cat sat on the mat", "cat"], "meteor")
    assert len(per_example) == 2
    assert per_example[0] > 0.99
    assert per_example[1] == 0.0
    assert means["meteor"] == pytest.approx(sum(per_example) / 2)
    assert means["exact_match"] == pytest.approx(0.5)


def test_generation_scores_empty() -> None:
    means, per_example = generation_scores([], [], "exact_match")
    assert means == {"exact_match": 0.0, "rouge_l": 0.0}
    assert per_example == []


# ----- the test verdict's bootstrap interval ---------------------------------------------


def test_paired_bootstrap_gives_scipys_interval() -> None:
    """The interval is computed without importing scipy.stats (0.7 s at the end of every
    run); it must be SciPy's percentile bootstrap to the last digits, for the same seed."""
    import random

    import numpy as np
    from scipy.stats import bootstrap

    from distillprompt.paired import BOOTSTRAP_SAMPLES, paired_interval

    rng = random.Random(11)
    for trial in range(40):
        size = rng.randint(2, 60)
        before = [float(rng.random() < 0.6) for _ in range(size)]
        after = [float(rng.random() < 0.7) if trial % 2 else rng.random() for _ in range(size)]
        differences = np.asarray(after) - np.asarray(before)
        if np.all(differences == differences[0]):
            continue
        seed = rng.randint(0, 100)
        mean, low, high = paired_interval(before, after, seed=seed)
        expected = bootstrap(
            (differences,), np.mean, n_resamples=BOOTSTRAP_SAMPLES, confidence_level=0.95, method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        assert mean == pytest.approx(float(differences.mean()), abs=1e-12)
        assert (low, high) == pytest.approx((float(expected.low), float(expected.high)), abs=1e-12), trial
    # a prompt compared with itself: no spread, no resampling
    assert paired_interval([1.0, 0.0], [1.0, 0.0]) == (0.0, 0.0, 0.0)


def test_the_macro_f1_interval_is_scipys_paired_bootstrap_of_scikit_learns_f1() -> None:
    """The verdict's interval on macro-F1: the examples resampled with both prompts' answers
    and macro-F1 counted again, as SciPy's paired percentile bootstrap of scikit-learn's
    macro-F1 difference gives it."""
    import random

    import numpy as np
    from scipy.stats import bootstrap
    from sklearn.metrics import f1_score

    from distillprompt.paired import BOOTSTRAP_SAMPLES, label_codes, paired_interval

    labels = ["very negative", "negative", "neutral", "positive", "very positive"]
    rng = random.Random(5)
    for trial in range(3):
        size = rng.randint(20, 40)
        targets = [rng.choice(labels) for _ in range(size)]
        before = [t if rng.random() < 0.4 else rng.choice([*labels, None]) for t in targets]
        after = [t if rng.random() < 0.6 else rng.choice([*labels, None]) for t in targets]
        codes = [np.asarray(label_codes(labels, values), dtype=float) for values in (before, after, targets)]

        def f1_gain(old, new, truth):
            kept = list(range(len(labels)))
            return (f1_score(truth, new, labels=kept, average="macro", zero_division=0)
                    - f1_score(truth, old, labels=kept, average="macro", zero_division=0))

        expected = bootstrap(
            tuple(codes), f1_gain, paired=True, vectorized=False, n_resamples=BOOTSTRAP_SAMPLES,
            confidence_level=0.95, method="percentile", rng=np.random.default_rng(trial),
        ).confidence_interval
        mean, low, high = paired_interval(*codes, label_count=len(labels), seed=trial)
        assert mean == pytest.approx(f1_gain(*codes), abs=1e-12)
        assert (low, high) == pytest.approx((float(expected.low), float(expected.high)), abs=1e-12), trial
