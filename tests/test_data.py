"""Loading tasks from local files: distillprompt.data.load_task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillprompt.data import load_task
from distillprompt.errors import UserError
from distillprompt.settings import DataSettings


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rows(count: int, prefix: str = "row", labels: tuple[str, ...] = ("positive", "negative")) -> list[dict[str, str]]:
    return [{"text": f"{prefix} {i}", "label": labels[i % len(labels)]} for i in range(count)]


def settings(path: Path, **kwargs) -> DataSettings:
    return DataSettings(dataset=str(path), **kwargs)


def user_error(data: DataSettings, seed: int = 0) -> str:
    with pytest.raises(UserError) as raised:
        load_task(data, seed)
    message = str(raised.value)
    assert "\n" not in message and message.strip() == message
    assert "Traceback" not in message
    return message


# ----- sources -------------------------------------------------------------------------


def test_jsonl_folder_with_train_and_test(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(20, "train"))
    write_jsonl(tmp_path / "test.jsonl", rows(12, "test"))
    task = load_task(settings(tmp_path, train_size=5, test_size=6), seed=0)
    assert task.train_split == "train"
    assert task.test_split == "test"
    assert task.sizes == {"train": 20, "test": 12}
    assert len(task.train) == 5 and len(task.test) == 6
    assert all(e.inputs["text"].startswith("train ") for e in task.train)
    assert all(e.inputs["text"].startswith("test ") for e in task.test)
    assert task.labels == ["negative", "positive"]  # sorted string labels
    assert task.input_columns == ["text"] and task.label_column == "label"
    assert task.is_classification
    # Each example keeps its row number and the row's own label.
    for example in task.train:
        assert example.inputs["text"] == f"train {example.index}"
        assert example.target == ("positive", "negative")[example.index % 2]


@pytest.mark.parametrize(
    "train",
    [
        # string labels with case variants, a null label, a blank input, an extra column
        [{"text": f"t{i}", "label": ["pos", "neg", "Pos", None][i % 4], "id": i} for i in range(30)]
        + [{"text": " ", "label": "neg", "id": 99}],
        # numeric labels, named with --label-names; an integral float among them
        [{"text": f"t{i}", "label": [0, 1, 1.0][i % 3]} for i in range(30)],
        # a row without the label key, a boolean column
        [{"text": f"t{i}", "label": "yes" if i % 2 else "no", "flag": i % 3 == 0} for i in range(30)]
        + [{"text": "no label here"}],
    ],
)
def test_json_files_read_without_datasets_give_the_task_datasets_gives(tmp_path: Path, monkeypatch, train) -> None:
    """Local JSON Lines are read with the standard library (importing datasets costs a
    second before the first request); the task must be the one datasets builds."""
    import distillprompt.data.files as data

    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", train[:12])
    numeric = isinstance(train[0]["label"], int)
    options = dict(train_size=8, test_size=6, val_size=4, **({"label_names": ["neg", "pos"]} if numeric else {}))
    files = {"train": [str(tmp_path / "train.jsonl")], "test": [str(tmp_path / "test.jsonl")]}
    assert data._read_json_splits(files) is not None  # these files take the path without datasets
    fast = load_task(settings(tmp_path, **options), seed=3)
    with monkeypatch.context() as patched:
        patched.setattr(data, "_read_json_splits", lambda files: None)  # what datasets reads
        slow = load_task(settings(tmp_path, **options), seed=3)
    assert fast.describe() == slow.describe()
    assert (fast.train, fast.test, fast.val) == (slow.train, slow.test, slow.val)


def test_a_json_column_mixing_text_and_numbers_is_left_to_datasets(tmp_path: Path) -> None:
    from distillprompt.data.files import _read_json_splits

    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "one"}])
    assert _read_json_splits({"train": [str(tmp_path / "train.jsonl")]}) is None


def test_single_csv_holds_test_out_of_train(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f"review number {i},{'good' if i % 2 else 'bad'}" for i in range(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_task(settings(path, train_size=10, test_size=15), seed=3)
    assert task.name == "reviews"
    assert task.train_split == "train"
    assert task.test_split == "train (held out)"
    assert len(task.train) == 10 and len(task.test) == 15
    train_rows = {e.index for e in task.train}
    test_rows = {e.index for e in task.test}
    assert train_rows.isdisjoint(test_rows)
    assert {e.inputs["text"] for e in task.train}.isdisjoint({e.inputs["text"] for e in task.test})
    assert task.labels == ["bad", "good"]


def test_held_out_test_is_capped_at_the_rows_left(tmp_path: Path) -> None:
    path = tmp_path / "small.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10)), encoding="utf-8")
    task = load_task(settings(path, train_size=6, test_size=50), seed=0)
    # 10 rows - 6 in the train sample = 4 rows left for the test sample
    assert len(task.test) == 4
    assert {e.index for e in task.train} | {e.index for e in task.test} == set(range(10))


def test_parquet_file(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "data.parquet"
    pd.DataFrame({"text": [f"sentence {i}" for i in range(12)], "label": ["yes", "no", "maybe"] * 4}).to_parquet(path)
    task = load_task(settings(path, train_size=4, test_size=4), seed=0)
    assert task.labels == ["maybe", "no", "yes"]
    assert task.source == str(path.resolve())
    assert task.name == "data"
    for example in task.train + task.test:
        assert example.target == ["yes", "no", "maybe"][example.index % 3]
        assert example.inputs == {"text": f"sentence {example.index}"}


def test_train_and_validation_folder_tests_on_validation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(10, "train"))
    write_jsonl(tmp_path / "validation.jsonl", rows(6, "valid"))
    task = load_task(settings(tmp_path, train_size=3, test_size=4), seed=0)
    assert task.test_split == "validation"
    assert len(task.test) == 4
    assert all(e.inputs["text"].startswith("valid ") for e in task.test)
    assert all(e.inputs["text"].startswith("train ") for e in task.train)


def test_pair_task_keeps_both_text_columns(tmp_path: Path) -> None:
    pairs = [
        {"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": ["entailment", "not_entailment"][i % 2]}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "train.jsonl", pairs)
    task = load_task(settings(tmp_path, text_column="premise,hypothesis", train_size=3, test_size=3), seed=0)
    assert task.input_columns == ["premise", "hypothesis"]
    for example in task.train + task.test:
        assert example.inputs == {"premise": f"premise {example.index}", "hypothesis": f"hypothesis {example.index}"}
    assert task.labels == ["entailment", "not_entailment"]


def test_class_label_names_survive_parquet(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    names = ["pos", "neg"]  # deliberately not sorted: the ClassLabel order must be kept
    ds = Dataset.from_dict(
        {"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]},
        features=Features({"text": Value("string"), "label": ClassLabel(names=names)}),
    )
    path = tmp_path / "classlabel.parquet"
    ds.to_parquet(str(path))
    task = load_task(settings(path, train_size=4, test_size=4), seed=0)
    assert task.labels == ["pos", "neg"]
    for example in task.train + task.test:
        assert example.target == names[example.index % 2]  # integer ids turned into names


def test_integer_labels_need_names(tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(8)), encoding="utf-8")
    assert "--label-names negative,positive" in user_error(settings(path, train_size=3, test_size=3))
    task = load_task(settings(path, train_size=3, test_size=3, label_names=["even", "odd"]), seed=0)
    assert task.labels == ["even", "odd"]
    assert all(e.target == ("even", "odd")[e.index % 2] for e in task.train + task.test)


def test_rows_without_label_are_skipped(tmp_path: Path) -> None:
    data = rows(10)
    data[0]["label"] = None
    data[1]["label"] = None
    write_jsonl(tmp_path / "train.jsonl", data)
    task = load_task(settings(tmp_path, train_size=4, test_size=10), seed=0)
    used = {e.index for e in task.train + task.test}
    assert not used & {0, 1}
    assert len(task.train) + len(task.test) == 8
    assert task.rows_dropped == {"train": {"empty_label": 2, "empty_input": 0}}


def test_generation_task_keeps_references(tmp_path: Path) -> None:
    qa = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "math.jsonl", qa)
    data = settings(path, text_column="question", label_column="answer", task="generation", train_size=3, test_size=4)
    task = load_task(data, seed=0)
    assert task.labels == []
    assert not task.is_classification
    assert task.task_type == "generation"
    for example in task.train + task.test:
        assert example.target == f"#### {2 * example.index}"
        assert example.inputs == {"question": f"What is {example.index} + {example.index}?"}


# ----- seeded samples ------------------------------------------------------------------


@pytest.fixture()
def big_folder(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", rows(80, "train"))
    write_jsonl(tmp_path / "test.jsonl", rows(40, "test"))
    return tmp_path


def test_same_seed_same_samples(big_folder: Path) -> None:
    data = settings(big_folder, train_size=10, test_size=10)
    first, second = load_task(data, seed=7), load_task(data, seed=7)
    assert first.train == second.train
    assert first.test == second.test
    assert first.digest() == second.digest()


def test_different_seed_different_train_sample(big_folder: Path) -> None:
    data = settings(big_folder, train_size=10, test_size=10)
    first, second = load_task(data, seed=1), load_task(data, seed=2)
    assert [e.index for e in first.train] != [e.index for e in second.train]
    assert first.digest() != second.digest()


def test_sample_is_a_subset_not_the_first_rows(big_folder: Path) -> None:
    task = load_task(settings(big_folder, train_size=10, test_size=10), seed=0)
    indices = [e.index for e in task.train]
    assert len(set(indices)) == 10
    assert indices == sorted(indices)
    assert indices != list(range(10))


# ----- errors --------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    message = user_error(settings(tmp_path / "nowhere.csv"))
    assert "does not exist" in message
    assert "nowhere.csv" in message
    message = user_error(settings(tmp_path / "no-such-folder"))
    assert "does not exist" in message


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,b\n", encoding="utf-8")
    message = user_error(settings(path))
    assert "'.txt'" in message
    assert ".csv" in message and ".parquet" in message


def test_unknown_column_lists_available_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "label": "ab"[i % 2], "idx": i} for i in range(6)])
    message = user_error(settings(tmp_path, train_size=2))  # text_column defaults to "text"
    assert "'text'" in message
    assert "sentence" in message and "label" in message and "idx" in message
    assert "--text-column" in message
    message = user_error(settings(tmp_path, text_column="sentence", label_column="gold", train_size=2))
    assert "'gold'" in message and "sentence" in message


def test_test_split_missing_a_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"t{i}"} for i in range(4)])
    message = user_error(settings(tmp_path, train_size=2)).replace(str(tmp_path), "")
    # datasets may fill the absent column with nulls, so either message is fine as long as it names both
    assert "test" in message and "label" in message


def test_test_labels_unknown_to_train(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    write_jsonl(tmp_path / "test.jsonl", rows(4, labels=("neutral",)))
    message = user_error(settings(tmp_path, train_size=2))
    assert "neutral" in message


def test_empty_split_raises_user_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n", encoding="utf-8")
    user_error(settings(path, train_size=1))


def test_empty_split_message_says_empty(tmp_path: Path) -> None:
    path = tmp_path / "header_only.csv"
    path.write_text("text,label\n", encoding="utf-8")
    message = user_error(settings(path, train_size=1)).replace(str(path), "")
    assert "empty" in message


def test_split_without_labelled_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": None}, {"text": "b", "label": None}])
    message = user_error(settings(tmp_path, train_size=1))
    assert "no row with both an input and a label (2 empty label dropped)" in message and "--label-column" in message


def test_one_label_only(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6, labels=("spam",)))
    message = user_error(settings(tmp_path, train_size=2))
    assert "one label only" in message
    assert "spam" in message
    assert "--task generation" in message


def test_one_label_is_fine_for_generation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6, labels=("same answer",)))
    task = load_task(settings(tmp_path, task="generation", train_size=2, test_size=2), seed=0)
    assert task.labels == []


def test_train_size_larger_than_data(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(8))
    write_jsonl(tmp_path / "test.jsonl", rows(4))
    message = user_error(settings(tmp_path, train_size=9)).replace(str(tmp_path), "")
    assert "--train-size" in message
    assert "of 9" in message and "8 usable rows" in message


def test_train_sample_taking_every_row_of_a_single_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", rows(5))
    message = user_error(settings(path, train_size=5))
    assert "--train-size" in message


def test_non_utf8_file_raises_user_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9 au lait,a\nthe\xe9tre,b\nplain,a\n")
    user_error(settings(path, train_size=1))


def test_non_utf8_file_message_names_the_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9 au lait,a\nthe\xe9tre,b\nplain,a\n")
    message = user_error(settings(path, train_size=1)).replace(str(path), "")
    assert "UTF-8" in message


def test_folder_without_split_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "reviews.jsonl", rows(6))
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    message = user_error(settings(tmp_path))
    assert "train." in message and "test." in message
    assert "--dataset" in message


def test_folder_without_train_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", rows(6))
    message = user_error(settings(tmp_path))
    assert "no train.*" in message


def test_folder_mixing_file_types(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    (tmp_path / "test.csv").write_text("text,label\na,positive\nb,negative\n", encoding="utf-8")
    message = user_error(settings(tmp_path))
    assert "mixes file types" in message


def test_unknown_split_name(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    message = user_error(settings(tmp_path, test_split="holdout", train_size=2))
    assert "'holdout'" in message and "train" in message
