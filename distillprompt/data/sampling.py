"""``load_task``: the splits, their columns and labels, and the seeded train, validation and
test samples drawn from them."""

from __future__ import annotations

import logging
import random
from typing import Any

from ..errors import UserError
from ..llm.limits import text_tokens
from ..settings import DataSettings

from .files import load_splits
from .labels import checked_labels, count_text
from .task import DEMO_POOL_SIZE, Example, Task

log = logging.getLogger(__name__)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _pick_test_split(available: list[str], requested: str | None, train_split: str) -> str | None:
    if requested:
        return requested
    for name in ("test", "validation", "valid", "dev"):
        if name in available and name != train_split:
            return name
    return None


def load_task(settings: DataSettings, seed: int, *, need_train: bool = True, context_tokens: int | None = None) -> Task:
    """Loads the dataset, checks its rows and labels, and draws the seeded samples.

    Every check runs here, before any LLM request: rows without an input or a label are
    dropped and counted, and so are rows whose input alone is longer than ``context_tokens``
    (the target model's context, when it is known: no prompt could send them), label
    spellings that differ only in case or surrounding spaces are merged (and reported),
    numeric labels without names are refused, and a test split that is the train split is
    refused. With ``need_train=False`` (scoring a given prompt on the test sample) a train
    size larger than the data is capped instead of refused; the test sample stays the one an
    optimization run with the same settings would use."""
    splits, name, source = load_splits(settings)
    train_split, test_split = _chosen_splits(settings, list(splits.keys()), name)
    rows = _UsableRows(settings, splits, name, context_tokens)
    rows.read(train_split, test_split, need_train)
    train_all, test_pool = rows.pools[train_split], rows.pools.get(test_split) if test_split is not None else None

    train_size = min(settings.train_size, len(train_all)) if not need_train else settings.train_size
    if train_size > len(train_all):
        raise UserError(
            f"the train sample of {settings.train_size} is larger than the {len(train_all)} usable rows of split "
            f"{train_split!r}: lower --train-size"
        )
    train_indices = sorted(random.Random(f"{seed}:train").sample(range(len(train_all)), train_size))
    train = [train_all[i] for i in train_indices]
    if test_pool is None:
        taken = set(train_indices)
        test_pool = [example for i, example in enumerate(train_all) if i not in taken]
        test_split = f"{train_split} (held out)"
        if not test_pool:
            raise UserError(
                f"no rows are left for a test sample: {name} has only a {train_split!r} split and the train sample "
                "takes it all; lower --train-size or add a test split"
            )
    test = _draw(test_pool, settings.test_size, f"{seed}:test", "test", test_split)
    unknown = sorted({example.target for example in test} - set(rows.labels)) if rows.labels else []
    if unknown:
        raise UserError(
            f"split {test_split!r} has labels the train split lacks ({', '.join(unknown[:5])}): "
            "use splits with the same label set"
        )
    val: list[Example] = []
    val_split = None
    if settings.val_size and need_train:
        if rows.validation_split is not None:
            val_split = rows.validation_split
            val = _draw(rows.pools[val_split], settings.val_size, f"{seed}:val", "validation", val_split)
        else:
            val, val_split = _held_out_validation(settings, seed, name, train_split, train_all, train_indices,
                                                  test if test_split.endswith("(held out)") else [])
    return Task(
        name=name, source=source, task_type=settings.task, input_columns=list(settings.text_column),
        label_column=settings.label_column, labels=rows.labels, train=train, test=test, train_split=train_split,
        test_split=test_split, generation_metric=settings.generation_metric,
        sizes={split: len(splits[split]) for split in splits.keys()}, val=val, val_split=val_split,
        rows_dropped=rows.dropped, label_changes=rows.label_changes,
        demo_pool=_demo_pool(train_all, [*train, *val, *test], seed) if need_train else [],
    )


def _chosen_splits(settings: DataSettings, available: list[str], name: str) -> tuple[str, str | None]:
    """The train split and the test split (None: the test sample is held out of train)."""
    train_split = settings.train_split or ("train" if "train" in available else available[0])
    test_split = _pick_test_split(available, settings.test_split, train_split)
    for split in (train_split, test_split):
        if split is not None and split not in available:
            raise UserError(f"dataset {name} has no split {split!r}: use one of {', '.join(available)}")
    if test_split == train_split:
        raise UserError(
            f"--test-split {test_split!r} is the train split, so test rows would be train rows: name another split, "
            "or leave --test-split out to hold test rows out of the train split"
        )
    return train_split, test_split


class _UsableRows:
    """The usable rows of the splits a run reads, by split (``pools``), with the labels checked
    across them, the rows dropped and the label spellings changed, and the validation split
    no other sample uses (``validation_split``), when the run validates on one."""

    def __init__(self, settings: DataSettings, splits: Any, name: str, context_tokens: int | None) -> None:
        self.settings = settings
        self.splits = splits
        self.name = name
        self.context_tokens = context_tokens
        self.wanted = [*settings.text_column, settings.label_column]
        self.pools: dict[str, list[Example]] = {}
        self.dropped: dict[str, dict[str, int]] = {}
        self.labels: list[str] = []
        self.label_changes: list[str] = []
        self.validation_split: str | None = None

    def read(self, train_split: str, test_split: str | None, need_train: bool) -> None:
        settings, name, splits = self.settings, self.name, self.splits
        columns = list(splits[train_split].column_names)
        missing = [column for column in self.wanted if column not in columns]
        if missing:
            raise UserError(
                f"dataset {name} has no column {', '.join(map(repr, missing))}: set --text-column/--label-column to "
                f"one of {', '.join(columns)}"
            )
        label_names = _class_names(splits[train_split].features[settings.label_column])
        self._add(train_split, label_names)
        if test_split is not None:
            absent = [column for column in self.wanted if column not in splits[test_split].column_names]
            if absent:
                raise UserError(
                    f"split {test_split!r} of {name} lacks column {', '.join(map(repr, absent))}: give a --test-split "
                    "with the same columns as the train split"
                )
            self._add(test_split, label_names)
        if settings.val_size and need_train:
            self.validation_split = _unused_validation_split(settings, splits, (train_split, test_split))
            if self.validation_split is not None:
                self._add(self.validation_split, label_names)
        self.labels, self.pools, self.label_changes = checked_labels(settings, label_names, self.pools, train_split, name)
        for line in self.label_changes:
            log.warning("%s", line)
        for split, counts in self.dropped.items():
            if sum(counts.values()):
                log.warning("split %s: %d rows dropped (%s)", split, sum(counts.values()), count_text(counts))

    def _add(self, split: str, label_names: list[str] | None) -> None:
        self.pools[split] = _examples(self.splits[split], self.settings, label_names, f"{self.name}/{split}",
                                      self.dropped.setdefault(split, {}), self.context_tokens)


def _demo_pool(train_all: list[Example], used: list[Example], seed: int) -> list[Example]:
    """Solved examples for demos: seeded train-split rows outside every sample."""
    taken = {id(example) for example in used}
    unused = [example for example in train_all if id(example) not in taken]
    picked = sorted(random.Random(f"{seed}:demos").sample(range(len(unused)), min(DEMO_POOL_SIZE, len(unused))))
    return [unused[i] for i in picked]


def _unused_validation_split(settings: DataSettings, splits: Any, used: tuple[str, str | None]) -> str | None:
    """A validation split that neither train nor test uses and that has the train columns."""
    for split in ("validation", "valid", "dev"):
        if split in splits.keys() and split not in used:
            if all(c in splits[split].column_names for c in (*settings.text_column, settings.label_column)):
                return split
    return None


def _held_out_validation(
    settings: DataSettings,
    seed: int,
    name: str,
    train_split: str,
    train_all: list[Example],
    train_indices: list[int],
    held_out_test: list[Example],
) -> tuple[list[Example], str]:
    """The validation sample when no unused validation split exists: the train split's rows
    outside the train sample and outside a held-out test sample."""
    taken, tested = set(train_indices), {id(example) for example in held_out_test}
    pool = [example for i, example in enumerate(train_all) if i not in taken and id(example) not in tested]
    where = f"{train_split} (held out)"
    if not pool:
        raise UserError(
            f"no rows are left for a validation sample of {name}: lower --train-size, add a validation split, "
            "or pass --val-size 0 to select on train only"
        )
    return _draw(pool, settings.val_size, f"{seed}:val", "validation", where), where


def _draw(pool: list[Example], wanted: int, rng_key: str, sample: str, where: str) -> list[Example]:
    """A seeded sample of ``wanted`` examples in pool order, capped (with a warning) at the pool."""
    size = min(wanted, len(pool))
    if size < wanted:
        log.warning("%s sample capped at the %d rows of %s (asked for %d)", sample, size, where, wanted)
    rng = random.Random(rng_key)
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), size))]


def _class_names(feature: Any) -> list[str] | None:
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _examples(
    rows: Any, settings: DataSettings, label_names: list[str] | None, where: str, dropped: dict[str, int],
    context_tokens: int | None = None,
) -> list[Example]:
    """The split's rows with an input and a label; the others are counted in ``dropped`` by
    reason (``empty_label``: null, blank or -1 in a hub dataset; ``empty_input``: a blank input
    column; ``longer_than_context``: with ``context_tokens``, an input longer than that
    alone, estimated at 4 characters a token). Class labels keep their spelling here:
    ``_checked_labels`` merges variants and reports what it changed."""
    if len(rows) == 0:
        raise UserError(f"split {where} is empty: give a split with rows (--train-split/--test-split)")
    examples = []
    dropped.update(empty_label=0, empty_input=0)
    if context_tokens:
        dropped["longer_than_context"] = 0
    keep_spelling = settings.task == "classification" and label_names is None
    # One columnar read: indexing a datasets column row by row costs milliseconds a row.
    columns = rows.select_columns(list(dict.fromkeys([*settings.text_column, settings.label_column]))).to_dict()
    for index in range(len(rows)):
        raw = columns[settings.label_column][index]
        if label_names is not None and isinstance(raw, int):
            target = label_names[raw] if 0 <= raw < len(label_names) else ""
        else:
            target = _as_text(raw)
        if not target:
            dropped["empty_label"] += 1
            continue
        if keep_spelling and isinstance(raw, str):
            target = raw
        inputs = {column: _as_text(columns[column][index]) for column in settings.text_column}
        if not all(inputs.values()):
            dropped["empty_input"] += 1
            continue
        if context_tokens and sum(text_tokens(value) for value in inputs.values()) > context_tokens:
            dropped["longer_than_context"] += 1  # no prompt could send it: every request would be refused
            continue
        examples.append(Example(index=index, inputs=inputs, target=target))
    if not examples:
        raise UserError(
            f"split {where} has no row with both an input and a label ({count_text(dropped)} dropped): "
            "check --text-column and --label-column"
        )
    return examples
