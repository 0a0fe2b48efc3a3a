"""Answer parsing and scoring.

Parsing is lenient and reads an answer that reasons first: the text inside the *last*
``<ans>…</ans>`` if present (a missing closing tag is forgiven: generation stops at it),
else the whole reply; for classification, an exact label match first, then the label
mentioned last (the conclusion follows the reasoning). Case and punctuation are ignored.
An answer that cannot be parsed is ``None`` and scores as wrong; it never raises.
"""

from __future__ import annotations

import re
import shutil
import warnings
import string
from functools import lru_cache
from pathlib import Path

from .errors import UserError

# The answer's tags: the task template asks for them (templates.py), the parser reads them,
# and the registered model (mlflow_project/prompt_model.py) stops at the closing one. They
# live here, with the parser, in a module of the standard library only: that model imports
# it where only its own requirements are installed.
ANSWER_OPEN, ANSWER_CLOSE = "<ans>", "</ans>"
# Stop sequences: a reply is complete once its closing tag is written, so the endpoint
# stops there instead of generating up to max_tokens (a large saving on local models).
ANSWER_STOP = (ANSWER_CLOSE,)
ANSWER_TAG = re.compile(r"<\s*ans\s*>(.*?)(?:<\s*/\s*ans\s*>|$)", re.IGNORECASE | re.DOTALL)
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def answer_text(reply: str) -> str:
    """The part of a reply that holds the answer: inside the last non-empty <ans> tags, else
    all of it."""
    found = [match.group(1).strip() for match in ANSWER_TAG.finditer(reply or "")]
    found = [inner for inner in found if inner]
    return found[-1] if found else (reply or "").strip()


def parse_label(reply: str, labels: list[str]) -> str | None:
    """The label a reply gives, or None when it names none of them."""
    reply = reply if isinstance(reply, str) else ("" if reply is None else str(reply))
    normalized_labels = {normalize(label): label for label in labels}
    for candidate in (answer_text(reply), reply):
        text = normalize(candidate)
        if not text:
            continue
        if text in normalized_labels:
            return normalized_labels[text]
        found = _last_mentioned(text, normalized_labels)
        if found is not None:
            return found
    return None


def _last_mentioned(text: str, normalized_labels: dict[str, str]) -> str | None:
    best: tuple[int, int, str] | None = None
    padded = f" {text} "
    for norm, label in normalized_labels.items():
        if not norm:
            continue
        position = padded.rfind(f" {norm} ")
        if position < 0:
            continue
        # the one that ends last; where two end together ("entailment", "not entailment") the longer
        key = (position + len(norm), len(norm), label)
        if best is None or key > best:
            best = key
    return best[2] if best else None


def classification_scores(predictions: list[str | None], targets: list[str], labels: list[str]) -> dict[str, float]:
    """Macro-F1 over the task's labels (unparsed answers count as wrong) and accuracy.

    Counted here rather than with scikit-learn, whose import would delay every run's first
    score (docs/decisions.md). The formulas are scikit-learn's (``average="macro",
    zero_division=0``: F1 = 2·TP / (2·TP + FP + FN), 0 where a label is neither predicted
    nor true), and a test checks them against it."""
    if not targets:
        return {"macro_f1": 0.0, "accuracy": 0.0}
    true_positives = dict.fromkeys(labels, 0)
    predicted_count = dict.fromkeys(labels, 0)
    target_count = dict.fromkeys(labels, 0)
    for prediction, target in zip(predictions, targets):
        if prediction in predicted_count:
            predicted_count[prediction] += 1
        if target in target_count:
            target_count[target] += 1
        if prediction == target and target in true_positives:
            true_positives[target] += 1
    f1 = [
        2 * true_positives[label] / (predicted_count[label] + target_count[label])
        if predicted_count[label] + target_count[label] else 0.0
        for label in labels
    ]
    correct = sum(prediction == target for prediction, target in zip(predictions, targets))
    return {"macro_f1": sum(f1) / len(f1) if f1 else 0.0, "accuracy": correct / len(targets)}


# ----- generation ----------------------------------------------------------------------


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over lower-cased word tokens (longest common subsequence)."""
    a, b = normalize(prediction).split(), normalize(reference).split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def final_number(text: str) -> float | None:
    """The last number in a text (``1,234.5`` and ``#### 42`` forms included)."""
    matches = NUMBER.findall(text or "")
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(prediction: str, reference: str) -> float:
    predicted, expected = final_number(prediction), final_number(reference)
    if predicted is None or expected is None:
        return 0.0
    return float(abs(predicted - expected) <= 1e-6 * max(1.0, abs(expected)))


# Lexicographer file names of WordNet 3.0 (the ``lexnames`` file nltk expects); Debian's
# wordnet-base package ships the dictionary without it.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FIX = "install WordNet with `python -m nltk.downloader wordnet` or `apt-get install wordnet-base`"


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader, from nltk's data path or Debian's wordnet-base files."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet as corpus

        corpus.ensure_loaded()
        return corpus
    except LookupError:
        pass
    if not (DEBIAN_WORDNET / "index.noun").is_file():
        raise UserError(f"METEOR needs WordNet, which is not installed: {WORDNET_FIX}")
    root = Path("~/.cache/distillprompt/wordnet").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for source in DEBIAN_WORDNET.iterdir():
        target = root / source.name
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)
    lexnames = root / "lexnames"
    if not lexnames.exists():
        part = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
        lexnames.write_text(
            "".join(f"{i:02d}\t{name}\t{part[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))
        )
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))

    class DebianWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            return None  # the files are WordNet 3.0 itself: nothing to map, no other corpus to load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DebianWordNet(str(root), None)


def meteor(prediction: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    hypothesis, reference_tokens = normalize(prediction).split(), normalize(reference).split()
    if not hypothesis or not reference_tokens:
        return 0.0
    return float(meteor_score([reference_tokens], hypothesis, wordnet=wordnet()))


GENERATION_METRICS = {"meteor": meteor, "rouge_l": rouge_l, "exact_match": exact_match, "numeric": numeric_match}


def generation_scores(answers: list[str], references: list[str], metric: str) -> tuple[dict[str, float], list[float]]:
    """Means of the chosen metric (the optimization score), ROUGE-L and exact match, and the
    chosen metric per example."""
    per_metric = {
        name: [GENERATION_METRICS[name](a, r) for a, r in zip(answers, references)]
        for name in dict.fromkeys([metric, "rouge_l", "exact_match"])
    }
    means = {name: (sum(values) / len(values) if values else 0.0) for name, values in per_metric.items()}
    return means, per_metric[metric]
