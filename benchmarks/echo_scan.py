"""Which candidate sentences of finished runs the echo filter's run rule takes for echo.

    python benchmarks/echo_scan.py /tmp/sst5 /tmp/mr          # folders holding result.json files

Reads every candidate of every result.json below the folders, splits it into sentences as
candidate cleaning does, and prints each distinct sentence that is mostly made of 6-word
runs of a meta-prompt's own instructions (every stage's, for the run's labels), with the
count of distinct sentences read. It sends nothing: a check of the rule against what a real
model wrote, before a benchmark is replayed with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distillprompt import templates
from distillprompt.candidates import SENTENCE, EchoFilter
from distillprompt.data import Example, Task
from distillprompt.metrics import normalize


def filters(labels: list[str]) -> list[EchoFilter]:
    task = Task(name="scan", source="scan", task_type="classification", input_columns=["text"], label_column="label",
                labels=labels, train=[], test=[], train_split="train", test_split="test")
    shown = [Example(index=i, inputs={"text": f"an example text {i}"}, target=labels[0]) for i in range(2)]
    metas = [templates.rewrite(task, "P", 0.5, "macro-F1"), templates.distill(task, "P", shown),
             templates.distill(task, "P", shown, mistakes=""), templates.compress(task, "P"),
             templates.aggregate(task, ["P", "Q"]), templates.paraphrase(task, "P")]
    return [EchoFilter(meta) for meta in metas]


def main() -> None:
    sentences: dict[str, list[str]] = {}  # sentence: labels of the first run it was read in
    for folder in sys.argv[1:]:
        for path in sorted(Path(folder).rglob("result.json")):
            result = json.loads(path.read_text())
            for candidate in result.get("history", []):
                for line in candidate["prompt"].splitlines():
                    for sentence in SENTENCE.split(line):
                        if sentence.strip():
                            sentences.setdefault(sentence, result["task"]["labels"])
    by_labels = {tuple(labels): filters(labels) for labels in sentences.values()}
    flagged = 0
    for sentence, labels in sentences.items():
        words = normalize(sentence).split()
        if any(echo.mostly_borrowed(words) for echo in by_labels[tuple(labels)]):
            flagged += 1
            print(f"echo: {sentence}")
    print(f"{flagged} of {len(sentences)} distinct sentences taken for echo by the run rule")


if __name__ == "__main__":
    main()
