"""Which examples a round shows the optimizer model: random train examples, solved examples
for a prompt (demos), and what a distillation studies of a prompt's answers (its mistakes)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from ..data import Example, Task
from ..state import Candidate

Answered = tuple[Example, float, dict[str, str]]  # an example, its score, what the target answered on it


@dataclass(frozen=True)
class Mistakes:
    """What a distillation studies of a prompt's answers: the examples, what the target
    answered on each, and (classification) a line that counts its most frequent mistakes."""

    examples: list[Example]
    answers: list[dict[str, str]]
    summary: str | None


def _confusions(answered: list[Answered], wrong: list[Answered], most: int = 3) -> str:
    """One line over every example the prompt was scored on: how many it got right, and its
    most frequent mistakes (the correct label and the answer given instead, counted)."""
    pairs = Counter((entry[0].target, entry[2].get("output", "")) for entry in wrong)
    text = f"With this instruction the model was right on {len(answered) - len(wrong)} of {len(answered)} examples"
    if not pairs:
        return text + "."
    listed = "; ".join(
        f'"{given}" where the correct answer is "{correct}" ({count} {"time" if count == 1 else "times"})'
        for (correct, given), count in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:most]
    )
    return f"{text}. Its most frequent mistakes: {listed}."


def _covering(entries: list[Answered], count: int, taken: list[Answered]) -> list[Answered]:
    """``count`` of ``entries`` (in their order) not in ``taken``, a target not yet covered
    (by ``taken`` or the ones chosen) first."""
    left = [entry for entry in entries if all(entry[0] is not other[0] for other in taken)]
    covered = {entry[0].target for entry in taken}
    chosen: list[Answered] = []
    for entry in left:
        if len(chosen) < count and entry[0].target not in covered:
            chosen.append(entry)
            covered.add(entry[0].target)
    chosen += [entry for entry in left if all(entry is not other for other in chosen)][: max(0, count - len(chosen))]
    return chosen


def random_examples(train: list[Example], rng: random.Random, wanted: int) -> list[Example]:
    """``wanted`` random train examples (all of them if fewer), in sample order."""
    count = min(wanted, len(train))
    return [train[i] for i in sorted(rng.sample(range(len(train)), count))]


def stratified_demos(task: Task, rng: random.Random, wanted: int) -> list[Example]:
    """``wanted`` solved examples for a prompt, from the train-split rows outside every sample
    (``task.demo_pool``; none when there are none), stratified by label: one of each label in
    a random order before a second of any; in a random order."""
    pool = task.demo_pool
    if not task.is_classification:
        return rng.sample(pool, min(wanted, len(pool)))
    by_label: dict[str, list[Example]] = {}
    for example in pool:
        by_label.setdefault(example.target, []).append(example)
    for examples in by_label.values():
        rng.shuffle(examples)
    labels = [label for label in task.labels if by_label.get(label)]
    rng.shuffle(labels)
    picked: list[Example] = []
    while len(picked) < wanted and any(by_label.get(label) for label in labels):
        for label in labels:
            if by_label.get(label) and len(picked) < wanted:
                picked.append(by_label[label].pop())
    rng.shuffle(picked)
    return picked


def carried_demos(task: Task, candidate: Candidate) -> list[Example]:
    """The solved examples a candidate's prompt carries (none for a bare instruction)."""
    if not candidate.demos:
        return []
    by_index = {example.index: example for example in task.demo_pool}
    return [by_index[index] for index in candidate.demos if index in by_index]


def recorded_answers(task: Task, record: list[float], refused: set[int]) -> list[Answered]:
    """A prompt's answers on the train sample from its saved record (label codes), but the
    rows whose request was refused (no answer: nothing to learn from)."""
    entries: list[Answered] = []
    for example, code in zip(task.train, record):
        if example.index in refused:
            continue
        label = task.labels[int(code)] if code >= 0 else None
        entries.append((example, float(label == example.target), {"output": label or "no label"}))
    return entries


def mistakes_in(answered: list[Answered], rng: random.Random, wanted: int, classification: bool) -> Mistakes:
    """``wanted`` of the answered examples for a distillation: mostly ones the prompt got wrong
    (at most three in five), then ones it got right, each chosen to cover the labels before
    repeating one, in train order; for classification, a line counting its mistakes."""
    if not answered:
        return Mistakes([], [], None)
    wrong = [entry for entry in answered if entry[1] < 1.0]
    right = [entry for entry in answered if entry[1] >= 1.0]
    # the worst first for a graded metric; equal scores (classification) in a random order
    rng.shuffle(wrong)
    wrong.sort(key=lambda entry: entry[1])
    rng.shuffle(right)
    picked = _covering(wrong, min(len(wrong), max(1, (3 * wanted) // 5)), [])
    picked += _covering(right, wanted - len(picked), picked)
    picked += _covering(wrong, wanted - len(picked), picked)
    picked.sort(key=lambda entry: entry[0].index)
    return Mistakes([entry[0] for entry in picked], [entry[2] for entry in picked],
                    _confusions(answered, wrong) if classification else None)
