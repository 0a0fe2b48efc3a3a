"""Data checks through the CLI: every problem is found before the first LLM request, named
in one line with its fix (exit 2), or repaired in the open with counts."""

from __future__ import annotations

import json
from pathlib import Path

from distillprompt.data import load_task
from distillprompt.settings import DataSettings
from tests.conftest import review_rows, run_cli, write_jsonl
from tests.endpoint import ScriptedEndpoint
from tests.test_cli import base_args, one_line_error


def small_run(endpoint: ScriptedEndpoint, dataset: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = base_args(endpoint, dataset, tmp_path, *extra)
    args[args.index("--train-size") + 1] = "8"
    args[args.index("--test-size") + 1] = "8"
    return args


def test_label_spellings_that_differ_in_case_or_spaces_become_one_label(endpoint, tmp_path):
    rows = review_rows(40, seed=3)
    for i, row in enumerate(rows):  # the example: one label written three ways
        if row["label"] == "positive":
            row["label"] = ("positive", "POSITIVE", "positive ")[i % 3]
        elif i % 5 == 1:
            row["label"] = "Negative"
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    completed = run_cli(*small_run(endpoint, data, tmp_path))
    assert completed.returncode == 0, completed.stderr
    positive_variants = sum(1 for r in rows if r["label"] in ("POSITIVE", "positive "))
    negative_variants = sum(1 for r in rows if r["label"] == "Negative")
    report = (f"labels merged (they differ only in case or surrounding spaces): 'POSITIVE', 'positive ' → "
              f"'positive' ({positive_variants} rows); 'Negative' → 'negative' ({negative_variants} rows)")
    assert report in completed.stderr  # said at load, before the run
    assert report in completed.stdout  # and again in the summary
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["task"]["labels"] == ["negative", "positive"]
    assert result["task"]["label_changes"] == [report]
    assert {row["target"] for row in result["test_outputs"]["initial"]} <= {"negative", "positive"}
    assert all("Possible answers: negative, positive." in e.content for e in endpoint.requests(kind="scoring"))


def test_equally_common_spellings_are_refused_before_any_request(endpoint, tmp_path):
    rows = review_rows(40, seed=4)
    for i, row in enumerate(rows):
        if row["label"] == "positive" and i % 4 == 0:
            row["label"] = "Positive"  # 10 'Positive', 10 'positive'
    data = write_jsonl(tmp_path / "tie.jsonl", rows)
    completed = run_cli(*small_run(endpoint, data, tmp_path))
    one_line_error(completed, "'Positive'", "'positive'", "equally often", "--label-names Positive=positive")
    assert not endpoint.requests()
    # the flag the message suggests settles it: one label, every row kept
    completed = run_cli(*small_run(endpoint, data, tmp_path, "--label-names", "Positive=positive"))
    assert completed.returncode == 0, completed.stderr
    assert "labels renamed by --label-names: Positive → positive" in completed.stdout
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["task"]["labels"] == ["negative", "positive"]
    assert {row["target"] for row in result["test_outputs"]["initial"]} <= {"negative", "positive"}
    # a pair for one spelling of another label leaves the twins apart: refused, naming the pair to add
    completed = run_cli(*small_run(endpoint, data, tmp_path, "--label-names", "negative=bad"))
    one_line_error(completed, "'Positive' and 'positive'", "equally often", "--label-names Positive=positive")
    # a pair that names a twin but keeps both spellings apart is refused too
    completed = run_cli(*small_run(endpoint, data, tmp_path, "--label-names", "Positive=Positive"))
    one_line_error(completed, "'Positive' and 'positive' as two labels", "Positive=positive")


def test_numeric_labels_without_names_are_refused_with_the_flag_to_use(endpoint, tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in review_rows(40, seed=5)]
    data = write_jsonl(tmp_path / "numeric.jsonl", rows)
    completed = run_cli(*small_run(endpoint, data, tmp_path))
    one_line_error(completed, "(0, 1)", "--label-names negative,positive", "ClassLabel")
    assert not endpoint.requests()


def test_label_names_give_numeric_labels_words_the_model_sees(endpoint, tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in review_rows(40, seed=5)]
    data = write_jsonl(tmp_path / "numeric.jsonl", rows)
    completed = run_cli(*small_run(endpoint, data, tmp_path, "--label-names", "negative,positive"))
    assert completed.returncode == 0, completed.stderr
    assert "labels renamed by --label-names: 0 → negative, 1 → positive" in completed.stdout
    scoring = endpoint.requests(kind="scoring")
    assert scoring and all("Possible answers: negative, positive." in e.content for e in scoring)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert {row["target"] for row in result["test_outputs"]["initial"]} == {"negative", "positive"}
    # names go to labels in their order: 0 is negative, 1 is positive
    task = load_task(DataSettings(dataset=str(data), train_size=8, test_size=8, label_names=["negative", "positive"]), 0)
    by_text = {r["text"]: r["label"] for r in rows}
    assert all(e.target == ("positive" if by_text[e.inputs["text"]] else "negative") for e in task.train + task.test)


def test_label_names_rename_text_labels_by_pairs(tmp_path):
    rows = [{"text": r["text"], "label": r["label"][:3]} for r in review_rows(20, seed=6)]  # 'pos'/'neg'
    write_jsonl(tmp_path / "short.jsonl", rows)
    task = load_task(DataSettings(dataset=str(tmp_path / "short.jsonl"), train_size=6, test_size=6,
                                  label_names=["pos=positive"]), seed=0)
    assert task.labels == ["neg", "positive"]
    assert {e.target for e in task.train + task.test} <= {"neg", "positive"}
    assert task.label_changes == ["labels renamed by --label-names: pos → positive"]


def test_label_names_of_the_wrong_count_name_the_labels(endpoint, tmp_path):
    rows = [{"text": r["text"], "label": int(r["label"] == "positive")} for r in review_rows(40, seed=5)]
    data = write_jsonl(tmp_path / "numeric.jsonl", rows)
    completed = run_cli(*small_run(endpoint, data, tmp_path, "--label-names", "bad,okay,good"))
    one_line_error(completed, "3 names for the 2 labels", "(0, 1)")


def test_rows_without_input_or_label_are_dropped_and_counted_per_split(endpoint, tmp_path):
    folder = tmp_path / "holes"
    train = review_rows(40, seed=7)
    for i in (0, 5, 9):
        train[i]["label"] = None
    train[12]["label"] = "  "
    train[20]["text"] = ""
    test = review_rows(20, seed=8)
    test[3]["text"] = "   "
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    completed = run_cli(*small_run(endpoint, folder, tmp_path))
    assert completed.returncode == 0, completed.stderr
    summary = "rows dropped: train 5 (4 empty label, 1 empty input); test 1 (1 empty input)"
    assert summary in completed.stdout
    assert "split train: 5 rows dropped (4 empty label, 1 empty input)" in completed.stderr
    task = json.loads((tmp_path / "out" / "result.json").read_text())["task"]
    assert task["rows_dropped"] == {"train": {"empty_label": 4, "empty_input": 1},
                                    "test": {"empty_label": 0, "empty_input": 1}}
    for request in endpoint.requests(kind="scoring"):
        assert "Input: \n" not in request.content and not request.content.rstrip().endswith("Input:")


def test_a_split_left_without_rows_is_an_error(endpoint, tmp_path):
    folder = tmp_path / "hollow"
    write_jsonl(folder / "train.jsonl", review_rows(40, seed=9))
    write_jsonl(folder / "test.jsonl", [{"text": "", "label": "positive"}, {"text": "fine", "label": None}])
    completed = run_cli(*small_run(endpoint, folder, tmp_path))
    one_line_error(completed, "hollow/test", "1 empty label, 1 empty input")
    assert not endpoint.requests()


def test_a_broken_jsonl_line_is_named_by_its_number(endpoint, tmp_path):
    lines = [json.dumps(row) for row in review_rows(30, seed=10)]
    lines[6] = lines[6][:-1]  # line 7 loses its closing brace
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    completed = run_cli(*small_run(endpoint, data, tmp_path))
    one_line_error(completed, f"{data} line 7 is not valid JSON", "fix or remove that line")
    assert "ERROR" not in completed.stderr
    assert not endpoint.requests()


def test_the_train_split_as_test_split_is_refused(endpoint, reviews_dir, tmp_path):
    completed = run_cli(*small_run(endpoint, reviews_dir, tmp_path, "--test-split", "train"))
    one_line_error(completed, "--test-split 'train' is the train split", "leave --test-split out")
    assert not endpoint.requests()


def test_held_out_test_and_validation_never_share_a_row_with_train(tmp_path):
    rows = review_rows(60, seed=11)
    write_jsonl(tmp_path / "only.jsonl", rows)
    for seed in range(5):
        task = load_task(DataSettings(dataset=str(tmp_path / "only.jsonl"), train_size=20, test_size=25, val_size=10), seed)
        samples = {"train": task.train, "test": task.test, "val": task.val}
        assert {name: len(s) for name, s in samples.items()} == {"train": 20, "test": 25, "val": 10}
        texts = {name: {e.inputs["text"] for e in s} for name, s in samples.items()}
        assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["test"] & texts["val"]
        assert task.test_split == "train (held out)" and task.val_split == "train (held out)"


def test_rows_longer_than_a_known_context_are_dropped_and_counted(tmp_path):
    """With --context-tokens (the model's context, when known), a row whose input alone is
    longer is dropped by the data check and counted, before any request: no prompt could
    send it. The endpoint, with that context, then refuses nothing."""
    folder = tmp_path / "long"
    train, test = review_rows(40, seed=12), review_rows(20, seed=13)
    for i in (2, 11):
        train[i]["text"] = "The cast was great and the ending was moving. " * 40  # about 470 tokens
    test[5]["text"] = "The pacing was dull and the script was lame. " * 40
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    with ScriptedEndpoint(context=400) as endpoint:
        completed = run_cli(*small_run(endpoint, folder, tmp_path, "--context-tokens", "400"))
        refused = [e for e in endpoint.requests(status=None) if e.status != 200]
    assert completed.returncode == 0, completed.stderr
    assert "rows dropped: train 2 (2 longer than context); test 1 (1 longer than context)" in completed.stdout
    assert "split train: 2 rows dropped (2 longer than context)" in completed.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["task"]["rows_dropped"]["train"] == {"empty_label": 0, "empty_input": 0, "longer_than_context": 2}
    assert not refused and result["refused"] == []
