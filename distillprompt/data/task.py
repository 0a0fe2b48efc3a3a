"""A task: its samples of examples, its labels and how it is scored."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any


log = logging.getLogger(__name__)

DEMO_POOL_SIZE = 1000


@dataclass(frozen=True)
class Example:
    """One row: its position in its split, its input columns and its label or reference."""

    index: int
    inputs: dict[str, str]
    target: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "inputs": self.inputs, "target": self.target}


@dataclass
class Task:
    name: str
    source: str
    task_type: str
    input_columns: list[str]
    label_column: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    train_split: str
    test_split: str
    generation_metric: str = "meteor"
    sizes: dict[str, int] = field(default_factory=dict)
    val: list[Example] = field(default_factory=list)  # selection sample, disjoint from train and test
    val_split: str | None = None
    # rows left out of each split read, by reason (empty_input, empty_label); 0s included
    rows_dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    # labels rewritten before sampling: spelling variants merged, --label-names applied
    label_changes: list[str] = field(default_factory=list)
    # rows of the train split in none of the samples (a seeded sample of at most DEMO_POOL_SIZE):
    # where a demos candidate's solved examples come from, so that no candidate is scored on
    # an example its prompt shows solved
    demo_pool: list[Example] = field(default_factory=list)
    # A task brought by an application (mlflow.genai.optimize_prompts): its prompt is a whole
    # template whose {{variables}} every candidate must keep, its score is the app's scorers'
    # (named here), and distillation may show what the app answered and what the judges said.
    template_variables: list[str] | None = None  # None: not a template task
    metric_name: str | None = None
    shows_outputs: bool = False

    @property
    def is_classification(self) -> bool:
        return self.task_type == "classification"

    @property
    def metric(self) -> str:
        """The metric a prompt's score is: macro-F1 for classification, else the generation metric."""
        if self.metric_name:
            return self.metric_name
        return "macro-F1" if self.is_classification else self.generation_metric

    def digest(self) -> str:
        """Identifies the exact samples: same digest, same train and test examples."""
        payload = json.dumps(
            [self.task_type, self.labels, [e.to_dict() for e in self.train], [e.to_dict() for e in self.test]]
            + ([[e.to_dict() for e in self.val]] if self.val else []),
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "task": self.task_type,
            "metric": self.metric,
            "input_columns": self.input_columns,
            "label_column": self.label_column,
            "labels": self.labels,
            "train_split": self.train_split,
            "test_split": self.test_split,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "val_split": self.val_split,
            "val_size": len(self.val),
            "split_rows": self.sizes,
            "rows_dropped": self.rows_dropped,
            "label_changes": self.label_changes,
            "digest": self.digest(),
        }
