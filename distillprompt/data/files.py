"""Reading a dataset's splits: local files (JSON read directly, the rest through
``datasets``), a folder of split files, or a Hugging Face hub id; a file that cannot be
read is named with the fix."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..settings import DataSettings

log = logging.getLogger(__name__)


FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
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
