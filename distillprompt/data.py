"""Tasks: a dataset loaded through Hugging Face ``datasets``, its columns, labels and seeded samples."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .settings import DataSettings

log = logging.getLogger(__name__)

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
MAX_CLASSES = 50


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


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or Path(spec).suffix.lower() in FILE_BUILDERS
        or spec.count("/") > 1
        or "\\" in spec
    )


def _split_files(folder: Path) -> tuple[str, dict[str, list[str]]]:
    files: dict[str, list[str]] = {}
    builders = set()
    for split, names in SPLIT_NAMES.items():
        for path in sorted(folder.iterdir()):
            stem = path.name.split(".")[0]
            base = re.sub(r"[-_]\d+(-of-\d+)?$", "", stem)
            if base in names and path.suffix.lower() in FILE_BUILDERS and path.is_file():
                files.setdefault(split, []).append(str(path))
                builders.add(FILE_BUILDERS[path.suffix.lower()])
    if not files:
        raise UserError(
            f"folder {folder} holds no train.*, validation.* or test.* file (csv, json, jsonl or parquet): "
            "name the split files that way or pass one file as --dataset"
        )
    if len(builders) > 1:
        raise UserError(f"folder {folder} mixes file types ({', '.join(sorted(builders))}): keep one type for all splits")
    if "train" not in files:
        raise UserError(f"folder {folder} has no train.* file: add one, the train sample comes from it")
    return builders.pop(), files


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class JsonRows:
    """Rows of local JSON files, read with the standard library, offering the few parts of a
    ``datasets.Dataset`` the task loader uses (``column_names``, ``features``, ``len``,
    ``select_columns(...).to_dict()``).

    Why not always ``datasets``: importing it takes about a second here, and every run
    waits for it before its first request. JSON values come out as ``datasets`` gives them
    for the files this path accepts (each column holds one kind of value: text, whole or
    decimal numbers, booleans, or null); any other file goes to ``datasets``, which reads
    or refuses it as before."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.column_names = list(dict.fromkeys(key for row in rows for key in row))
        self.columns = {column: [row.get(column) for row in rows] for column in self.column_names}
        self.features: dict[str, Any] = dict.fromkeys(self.column_names)  # no ClassLabel in JSON
        self._length = len(rows)

    def __len__(self) -> int:
        return self._length

    def select_columns(self, columns: list[str]) -> JsonRows:
        selected = JsonRows([])
        selected.column_names = list(columns)
        selected.columns = {column: self.columns[column] for column in columns}
        selected.features = dict.fromkeys(columns)
        selected._length = self._length
        return selected

    def to_dict(self) -> dict[str, list[Any]]:
        return dict(self.columns)


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "text" if isinstance(value, str) else "other"


def _read_json_splits(files: dict[str, list[str]]) -> dict[str, JsonRows] | None:
    """The splits of local JSON / JSON Lines files, or None when ``datasets`` should read
    them (a line that is not a JSON object, a column mixing kinds of values, nested values)."""
    splits = {}
    for split, paths in files.items():
        rows: list[dict[str, Any]] = []
        for name in paths:
            try:
                text = Path(name).read_text(encoding="utf-8")
                if text.lstrip().startswith("["):
                    parsed = json.loads(text)
                else:
                    parsed = [json.loads(line) for line in text.splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return None
            if not isinstance(parsed, list) or not all(isinstance(row, dict) for row in parsed):
                return None
            rows.extend(parsed)
        table = JsonRows(rows)
        for values in table.columns.values():
            kinds = {_json_kind(value) for value in values} - {None}
            if len(kinds) > 1 or "other" in kinds:
                return None
        splits[split] = table
    return splits


def load_splits(settings: DataSettings) -> tuple[Any, str, str]:
    """Returns (DatasetDict or dict of JsonRows, display name, source identity)."""
    spec = settings.dataset
    if spec and Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        files = _split_files(path)[1] if path.is_dir() else {"train": [str(path)]}
        if all(FILE_BUILDERS.get(Path(name).suffix.lower()) == "json" for names in files.values() for name in names):
            _refuse_empty_files(files)
            fast = _read_json_splits(files)
            if fast is not None:
                return fast, path.stem if path.is_file() else path.resolve().name, str(path.resolve())
    import datasets

    datasets.disable_progress_bars()
    # The library logs a failed read at ERROR level before raising; the user gets one line
    # from us instead (with the line number, for JSON).
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not spec:
        raise UserError("no dataset given: pass --dataset with a hub id, a data file or a folder of split files")
    path = Path(spec).expanduser()
    files: dict[str, list[str]] = {}
    try:
        if path.exists():
            if path.is_dir():
                builder, files = _split_files(path)
            else:
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise UserError(
                        f"dataset file {path} has an unsupported type {path.suffix or '(none)'!r}: "
                        "use .csv, .json, .jsonl or .parquet"
                    )
                files = {"train": [str(path)]}
            _refuse_empty_files(files)
            splits = datasets.load_dataset(builder, data_files=files)
            return splits, path.stem if path.is_file() else path.resolve().name, str(path.resolve())
        if _looks_like_path(spec):
            raise UserError(f"dataset path {spec} does not exist: check --dataset")
        splits = datasets.load_dataset(spec, settings.dataset_config)
        source = spec + (f":{settings.dataset_config}" if settings.dataset_config else "")
        return splits, spec.split("/")[-1], source
    except UserError:
        raise
    except Exception as error:
        reason = _first_line(_innermost(error))
        if _caused_by_encoding(error):
            raise UserError(f"dataset {spec} is not UTF-8 text: re-encode it, e.g. iconv -f latin1 -t utf-8") from None
        if path.exists():
            located = _first_bad_json_line(files)
            if located:
                raise UserError(located) from None
            raise UserError(f"dataset {spec} cannot be read ({reason}): check that the file is valid") from None
        raise UserError(
            f"dataset {spec!r} cannot be loaded from the Hugging Face hub ({reason}): check the id and "
            "--dataset-config, or pass a local file"
        ) from None


def _first_bad_json_line(files: dict[str, list[str]]) -> str | None:
    """Where a JSON or JSON Lines file first breaks, as a message naming the file and line.
    The library's own error names a byte offset in a block, which no editor shows."""
    for paths in files.values():
        for name in paths:
            path = Path(name)
            if FILE_BUILDERS.get(path.suffix.lower()) != "json":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return None
            if text.lstrip().startswith("["):  # one JSON document holding a list of rows
                try:
                    json.loads(text)
                except json.JSONDecodeError as error:
                    return f"{path} line {error.lineno} is not valid JSON ({error.msg}, column {error.colno}): fix that line"
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    return (f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}): "
                            "fix or remove that line (JSON Lines holds one object per line)")
                if not isinstance(row, dict):
                    return f"{path} line {number} is not a JSON object: write one object per line, e.g. {{\"text\": ..., \"label\": ...}}"
    return None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _innermost(error: BaseException) -> BaseException:
    return _chain(error)[-1]


def _caused_by_encoding(error: BaseException) -> bool:
    """datasets wraps decoding errors in its own; look through the whole chain."""
    for link in _chain(error):
        text = str(link).lower()
        if isinstance(link, UnicodeDecodeError) or "utf-8" in text or "utf8" in text or "invalid continuation" in text:
            return True
    return False


def _has_no_rows(path: Path) -> bool:
    """True for a data file without a single row (blank, header only, ``[]``, empty Parquet)."""
    try:
        if path.stat().st_size == 0:
            return True
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
        if suffix == ".csv":
            lines = [line for line in head.splitlines() if line.strip()]
            return len(lines) <= 1 and len(head) < (1 << 16)
        return head.strip() in (b"", b"[]", b"{}")
    except Exception:
        return False  # let the real reader report what is wrong


def _refuse_empty_files(files: dict[str, list[str]]) -> None:
    for split, paths in files.items():
        if all(_has_no_rows(Path(path)) for path in paths):
            raise UserError(
                f"split {split!r} ({', '.join(Path(p).name for p in paths)}) is empty: add rows to it or remove the file"
            )


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


def load_task(settings: DataSettings, seed: int, *, need_train: bool = True) -> Task:
    """Loads the dataset, checks its rows and labels, and draws the seeded samples.

    Every check runs here, before any LLM request: rows without an input or a label are
    dropped and counted, label spellings that differ only in case or surrounding spaces are
    merged (and reported), numeric labels without names are refused, and a test split that
    is the train split is refused. With ``need_train=False`` (scoring a given prompt on the
    test sample) a train size larger than the data is capped instead of refused; the test
    sample stays the one an optimization run with the same settings would use."""
    splits, name, source = load_splits(settings)
    available = list(splits.keys())
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
    train_rows = splits[train_split]
    columns = list(train_rows.column_names)
    wanted = [*settings.text_column, settings.label_column]
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise UserError(
            f"dataset {name} has no column {', '.join(map(repr, missing))}: set --text-column/--label-column to "
            f"one of {', '.join(columns)}"
        )
    label_names = _class_names(train_rows.features[settings.label_column])
    dropped: dict[str, dict[str, int]] = {}
    pools: dict[str, list[Example]] = {
        train_split: _examples(train_rows, settings, label_names, f"{name}/{train_split}", dropped.setdefault(train_split, {}))
    }
    if test_split is not None:
        test_rows = splits[test_split]
        absent = [column for column in wanted if column not in test_rows.column_names]
        if absent:
            raise UserError(
                f"split {test_split!r} of {name} lacks column {', '.join(map(repr, absent))}: give a --test-split "
                "with the same columns as the train split"
            )
        pools[test_split] = _examples(test_rows, settings, label_names, f"{name}/{test_split}", dropped.setdefault(test_split, {}))
    spare = _spare_validation_split(settings, splits, available, (train_split, test_split)) if settings.val_size and need_train else None
    if spare is not None:
        pools[spare] = _examples(splits[spare], settings, label_names, f"{name}/{spare}", dropped.setdefault(spare, {}))
    labels, pools, label_changes = _checked_labels(settings, label_names, pools, train_split, name)
    for line in label_changes:
        log.warning("%s", line)
    for split, counts in dropped.items():
        if sum(counts.values()):
            log.warning("split %s: %d rows dropped (%s)", split, sum(counts.values()), count_text(counts))
    train_all = pools[train_split]
    test_pool = pools.get(test_split) if test_split is not None else None

    train_size = settings.train_size
    if train_size > len(train_all) and not need_train:
        train_size = len(train_all)
    if train_size > len(train_all):
        raise UserError(
            f"the train sample of {settings.train_size} is larger than the {len(train_all)} usable rows of split "
            f"{train_split!r}: lower --train-size"
        )
    train_rng = random.Random(f"{seed}:train")
    train_indices = sorted(train_rng.sample(range(len(train_all)), train_size))
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
    if labels:
        unknown = sorted({example.target for example in test} - set(labels))
        if unknown:
            raise UserError(
                f"split {test_split!r} has labels the train split lacks ({', '.join(unknown[:5])}): "
                "use splits with the same label set"
            )
    if settings.val_size and need_train:
        if spare is not None:
            val, val_split = _draw(pools[spare], settings.val_size, f"{seed}:val", "validation", spare), spare
        else:
            val, val_split = _held_out_validation(settings, seed, name, train_split, train_all, train_indices,
                                                  test if test_split.endswith("(held out)") else [])
    else:
        val, val_split = [], None
    return Task(
        name=name,
        source=source,
        task_type=settings.task,
        input_columns=list(settings.text_column),
        label_column=settings.label_column,
        labels=labels,
        train=train,
        test=test,
        train_split=train_split,
        test_split=test_split,
        generation_metric=settings.generation_metric,
        sizes={split: len(splits[split]) for split in available},
        val=val,
        val_split=val_split,
        rows_dropped=dropped,
        label_changes=label_changes,
    )


def _spare_validation_split(settings: DataSettings, splits: Any, available: list[str], used: tuple[str, str | None]) -> str | None:
    """A validation split that neither train nor test uses and that has the train columns."""
    for split in ("validation", "valid", "dev"):
        if split in available and split not in used:
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
    """The validation sample when no spare validation split exists: the train split's rows
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
    rows: Any, settings: DataSettings, label_names: list[str] | None, where: str, dropped: dict[str, int]
) -> list[Example]:
    """The split's rows with an input and a label; the others are counted in ``dropped`` by
    reason (``empty_label``: null, blank or -1 in a hub dataset; ``empty_input``: a blank input
    column). Class labels keep their spelling here: ``_checked_labels`` merges variants and
    reports what it changed."""
    if len(rows) == 0:
        raise UserError(f"split {where} is empty: give a split with rows (--train-split/--test-split)")
    examples = []
    dropped.update(empty_label=0, empty_input=0)
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
        examples.append(Example(index=index, inputs=inputs, target=target))
    if not examples:
        raise UserError(
            f"split {where} has no row with both an input and a label ({count_text(dropped)} dropped): "
            "check --text-column and --label-column"
        )
    return examples


def count_text(dropped: dict[str, int]) -> str:
    """``{'empty_label': 4, 'empty_input': 1}`` as "4 empty label, 1 empty input"."""
    parts = [f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count]
    return ", ".join(parts) or "none"


NUMERIC_LABEL = re.compile(r"-?\d+")
OPAQUE_LABEL = re.compile(r"(?i)label[_ ]?\d+")  # what hub models and exports call unnamed classes


def _checked_labels(
    settings: DataSettings, label_names: list[str] | None, pools: dict[str, list[Example]], train_split: str, name: str
) -> tuple[list[str], dict[str, list[Example]], list[str]]:
    """The task's labels and the pools with their targets rewritten, plus one report line per
    kind of change. Spellings that differ only in case or surrounding spaces are one label,
    written the way most rows write it (refused when two spellings are equally common);
    ``--label-names`` then renames labels; numeric or opaque labels left without names are
    refused, since the model would be asked to answer "0" or "1" with no idea what they mean."""
    if settings.task != "classification":
        return [], pools, []
    changes: list[str] = []
    mapping: dict[str, str] = {}
    if label_names is None:
        mapping, merged = _merge_spellings(pools, settings.label_column, name, _renamed_by_pairs(settings.label_names))
        if merged:
            changes.append(f"labels merged (they differ only in case or surrounding spaces): {merged}")
        labels = sorted({mapping.get(example.target, example.target) for example in pools[train_split]}, key=_label_order)
    else:
        labels = list(label_names)
    renames: dict[str, str] = {}
    if settings.label_names:
        renames = _renames(settings.label_names, labels, settings.label_column, name)
        shown = ", ".join(f"{old} → {new}" for old, new in renames.items() if old != new)
        if shown:
            changes.append(f"labels renamed by --label-names: {shown}")
        labels = list(dict.fromkeys(renames.get(label, label) for label in labels))  # pairs may join spellings
        if label_names is None:  # labels read from text stay sorted; a ClassLabel's keep its order
            labels.sort(key=_label_order)
        _check_case_twins(labels, settings.label_column, name)

    def final(target: str) -> str:
        merged = mapping.get(target, target)
        return renames.get(merged, merged)

    if mapping or renames:
        pools = {
            split: [e if final(e.target) == e.target else replace(e, target=final(e.target)) for e in pool]
            for split, pool in pools.items()
        }
    _check_label_set(settings, labels, bool(label_names) or bool(settings.label_names), name)
    return labels, pools, changes


def _label_order(label: str) -> tuple[int, int | str]:
    """Numbers by value (2 before 10), then text."""
    return (0, int(label)) if NUMERIC_LABEL.fullmatch(label) else (1, label)


def _renamed_by_pairs(given: list[str]) -> set[str]:
    """The labels that ``--label-names old=new`` pairs name (none for a plain list of names)."""
    return {item.split("=", 1)[0].strip() for item in given} if given and all("=" in i for i in given) else set()


def _merge_spellings(
    pools: dict[str, list[Example]], column: str, name: str, renamed: set[str] = frozenset()
) -> tuple[dict[str, str], str]:
    """Maps every spelling of a label to its most common form; returns the map and a report.
    Two spellings equally common are left to ``--label-names`` pairs when one names them, and
    refused otherwise."""
    spellings: Counter[str] = Counter(example.target for pool in pools.values() for example in pool)
    groups: dict[str, Counter[str]] = {}
    for spelling, count in spellings.items():
        groups.setdefault(spelling.strip().casefold(), Counter())[spelling.strip()] += count
    mapping: dict[str, str] = {}
    report = []
    for forms in groups.values():
        ranked = forms.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            if renamed & set(forms):
                for spelling in spellings:  # the pairs decide; only surrounding spaces go here
                    if spelling.strip() in forms and spelling != spelling.strip():
                        mapping[spelling] = spelling.strip()
                continue
            first, second = sorted(form for form, count in ranked if count == ranked[0][1])[:2]
            raise UserError(
                f"column {column!r} of {name} writes one label as {first!r} and {second!r} equally often "
                f"({ranked[0][1]} rows each), so neither spelling can be chosen: write the label one way in the data, "
                f"or say which to use, e.g. --label-names {first}={second}"
            )
        canonical = ranked[0][0]
        variants = sorted(s for s in spellings if s.strip().casefold() == canonical.casefold() and s != canonical)
        if variants:
            rows = sum(spellings[v] for v in variants)
            report.append(f"{', '.join(repr(v) for v in variants)} → {canonical!r} ({rows} rows)")
        for spelling in spellings:
            if spelling.strip().casefold() == canonical.casefold():
                mapping[spelling] = canonical
    return {k: v for k, v in mapping.items() if k != v}, "; ".join(report)


def _renames(given: list[str], labels: list[str], column: str, name: str) -> dict[str, str]:
    """``--label-names``: either one name per label, in the labels' order, or ``old=new`` pairs."""
    if all("=" in item for item in given):
        renames = dict(item.split("=", 1) for item in given)
        renames = {old.strip(): new.strip() for old, new in renames.items()}
        unknown = [old for old in renames if old not in labels]
        if unknown:
            raise UserError(
                f"--label-names renames {', '.join(map(repr, unknown))}, which column {column!r} of {name} does not hold: "
                f"its labels are {', '.join(labels)}"
            )
    elif any("=" in item for item in given):
        raise UserError("--label-names mixes old=new pairs and plain names: write all pairs, or one name per label in order")
    else:
        if len(given) != len(labels):
            raise UserError(
                f"--label-names gives {len(given)} names for the {len(labels)} labels of column {column!r} of {name} "
                f"({', '.join(labels)}): give one name per label, in that order"
            )
        renames = dict(zip(labels, given))
    names = [renames.get(label, label) for label in labels]
    pairs = all("=" in item for item in given)  # pairs may deliberately join two labels into one
    if any(not n for n in names) or (not pairs and len(set(names)) != len(names)):
        raise UserError(f"--label-names gives empty or repeated names ({', '.join(names)}): give each label its own name")
    return renames


def _check_case_twins(labels: list[str], column: str, name: str) -> None:
    """After renames, two labels that differ only in case would be two classes the model cannot tell apart."""
    seen: dict[str, str] = {}
    for label in labels:
        other = seen.setdefault(label.casefold(), label)
        if other != label:
            raise UserError(
                f"column {column!r} of {name} still has {other!r} and {label!r} as two labels after --label-names: "
                f"add the pair {other}={label} or {label}={other}"
            )


def _check_label_set(settings: DataSettings, labels: list[str], named: bool, name: str) -> None:
    column = settings.label_column
    if any(re.fullmatch(r"-?\d*\.\d+", label) for label in labels):
        raise UserError(
            f"column {column!r} of {name} holds fractional numbers ({', '.join(labels[:3])} …), not "
            "classes: use --task generation for numeric answers, or another --label-column"
        )
    if len(labels) < 2:
        raise UserError(
            f"column {column!r} of {name} has one label only ({labels[0] if labels else 'none'}): "
            "classification needs at least two; check --label-column or use --task generation"
        )
    if len(labels) > MAX_CLASSES:
        raise UserError(
            f"column {column!r} of {name} has {len(labels)} distinct values, too many for classification: "
            "use --task generation or another --label-column"
        )
    if not named and all(NUMERIC_LABEL.fullmatch(label) or OPAQUE_LABEL.fullmatch(label) for label in labels):
        example = "negative,positive" if len(labels) == 2 else ",".join(f"name{i + 1}" for i in range(len(labels)))
        raise UserError(
            f"column {column!r} of {name} holds labels without meaning ({', '.join(labels[:6])}), so a model cannot "
            f"tell which to answer: pass --label-names {example} (one name per label, in the order "
            f"{', '.join(labels[:6])}) or give the column a ClassLabel feature with names"
        )
