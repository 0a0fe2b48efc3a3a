"""The console script, run in a child process against the scripted endpoint."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from distillprompt.settings import setting_specs
from tests.conftest import run_cli, write_jsonl
from tests.endpoint import ScriptedEndpoint


def base_args(endpoint: ScriptedEndpoint, dataset, tmp_path, *extra: str) -> list[str]:
    return [
        "optimize",
        "--dataset", str(dataset),
        "--base-url", endpoint.base_url,
        "--model", "test-model",
        "--epochs", "1",
        "--train-size", "20",
        "--test-size", "20",
        "--cache-path", str(tmp_path / "cache.sqlite"),
        "--output", str(tmp_path / "out"),
        "--executor", "local",
        *extra,
    ]


def test_optimize_reports_prompts_scores_and_reruns_from_cache(endpoint, reviews_dir, tmp_path):
    first = run_cli(*base_args(endpoint, reviews_dir, tmp_path))
    assert first.returncode == 0, first.stderr
    assert "initial prompt:" in first.stdout and "final prompt" in first.stdout
    assert "round 1/1 paraphrase" in first.stderr  # progress display per stage
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["final_prompt"] in first.stdout
    assert set(result["initial_scores"]) == {"train", "test"}
    # 11 meta-requests in the round, plus one more for each reply that copied its parent (the
    # usage report counts those apart); the rest are scoring requests for distinct prompts
    meta = Counter(e.stage for e in endpoint.requests(kind="meta"))
    retries = sum(u["calls"] for stage, u in result["usage"]["by_stage"].items() if stage.endswith("_copy_retry"))
    assert sum(meta.values()) == 11 + retries
    distinct = [c for c in result["history"] if c["duplicate_of"] is None]
    test_runs = 1 if result["final_candidate"] == 0 else 2
    # each distinct prompt on every train example, or until a race stopped it
    assert len(endpoint.requests(kind="scoring")) == sum(c["examples_scored"] for c in distinct) + 20 * test_runs

    sent = len(endpoint.requests())
    second = run_cli(*base_args(endpoint, reviews_dir, tmp_path))
    assert second.returncode == 0, second.stderr
    assert len(endpoint.requests()) == sent  # zero LLM requests the second time
    assert "LLM requests: 0 sent" in second.stdout
    assert json.loads((tmp_path / "out" / "result.json").read_text())["final_prompt"] == result["final_prompt"]


def test_no_cache_flag_sends_everything_again(endpoint, reviews_dir, tmp_path):
    assert run_cli(*base_args(endpoint, reviews_dir, tmp_path)).returncode == 0
    sent = len(endpoint.requests())
    again = run_cli(*base_args(endpoint, reviews_dir, tmp_path, "--no-cache"))
    assert again.returncode == 0, again.stderr
    assert len(endpoint.requests()) == 2 * sent


def test_settings_from_env_and_config_file(endpoint, reviews_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndataset = "{reviews_dir}"\ntrain_size = 10\ntest_size = 10\n[optimizer]\nepochs = 1\n')
    completed = run_cli(
        "optimize", "--config", str(config), "--output", str(tmp_path / "out"), "--cache-path", str(tmp_path / "c.sqlite"),
        "--executor", "local",
        env={"OPENAI_BASE_URL": endpoint.base_url, "DISTILLPROMPT_LLM__MODEL": "test-model"},
    )
    assert completed.returncode == 0, completed.stderr
    task = json.loads((tmp_path / "out" / "result.json").read_text())["task"]
    assert (task["train_size"], task["test_size"]) == (10, 10)


def test_evaluate_scores_one_prompt_on_the_test_sample(endpoint, reviews_dir, tmp_path):
    completed = run_cli(
        "evaluate", "--prompt", "Judge the overall sentiment and tone.", "--dataset", str(reviews_dir),
        "--base-url", endpoint.base_url, "--model", "test-model", "--test-size", "15",
        "--cache-path", str(tmp_path / "c.sqlite"), "--executor", "local",
    )
    assert completed.returncode == 0, completed.stderr
    assert "test (15 examples of" in completed.stdout and "macro_f1" in completed.stdout
    assert len(endpoint.requests(kind="scoring")) == 15
    assert not endpoint.requests(kind="meta")


def test_help_lists_every_setting():
    completed = run_cli("optimize", "--help")
    assert completed.returncode == 0
    for spec in setting_specs():
        assert spec.flag in completed.stdout, spec.flag
    assert "--no-cache" in completed.stdout and "--config" in completed.stdout


def one_line_error(completed, *fragments: str) -> None:
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_dataset_file(endpoint, tmp_path):
    completed = run_cli(*base_args(endpoint, tmp_path / "nope.jsonl", tmp_path))
    one_line_error(completed, "does not exist", "--dataset")


def test_unknown_column_lists_the_available_ones(endpoint, reviews_dir, tmp_path):
    completed = run_cli(*base_args(endpoint, reviews_dir, tmp_path, "--text-column", "review"))
    one_line_error(completed, "'review'", "text, label")


def test_empty_split(endpoint, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(30)])
    (folder / "test.jsonl").write_text("")
    completed = run_cli(*base_args(endpoint, folder, tmp_path))
    one_line_error(completed, "test")


def test_one_label_only(endpoint, tmp_path):
    data = write_jsonl(tmp_path / "same.jsonl", [{"text": f"t{i}", "label": "yes"} for i in range(40)])
    completed = run_cli(*base_args(endpoint, data, tmp_path))
    one_line_error(completed, "one label only")


def test_unreachable_endpoint(reviews_dir, tmp_path):
    with ScriptedEndpoint() as gone:
        pass  # started and stopped: its port now refuses connections
    completed = run_cli(*base_args(gone, reviews_dir, tmp_path))
    one_line_error(completed, "cannot reach the endpoint", "--base-url")


def test_wrong_api_key(reviews_dir, tmp_path):
    with ScriptedEndpoint(api_key="sk-right") as guarded:
        completed = run_cli(*base_args(guarded, reviews_dir, tmp_path), env={"OPENAI_API_KEY": "sk-wrong-planted"})
    one_line_error(completed, "401", "OPENAI_API_KEY")
    assert "sk-wrong-planted" not in completed.stderr + completed.stdout


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--epochs", "0"], "--epochs"),
        (["--train-size", "-3"], "--train-size"),
        (["--train-size", "500"], "--train-size"),
        (["--task", "ranking"], "invalid choice"),
        (["--bogus-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags(endpoint, reviews_dir, tmp_path, flags, fragment):
    one_line_error(run_cli(*base_args(endpoint, reviews_dir, tmp_path, *flags)), fragment)


def test_malformed_config_file(endpoint, reviews_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: [unclosed\n")
    one_line_error(run_cli(*base_args(endpoint, reviews_dir, tmp_path, "--config", str(config))), "cannot be parsed")


def test_on_a_terminal_a_progress_bar_shows_the_round_stage_count_and_time_left(endpoint, reviews_dir, tmp_path):
    import os
    import pty
    import re
    import select
    import subprocess
    import sys

    from tests.conftest import ROOT

    endpoint.latency = 0.02  # long enough for the bar to be drawn a few times
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal of 160 columns
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLPROMPT_", "OPENAI_", "MLFLOW_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "distillprompt", *base_args(endpoint, reviews_dir, tmp_path, "--no-cache")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, cwd=ROOT, env=env,
    )
    os.close(follower)
    screen = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    finally:
        process.wait(120)
        os.close(leader)
    text = screen.decode("utf-8", "replace")
    assert process.returncode == 0, text[-2000:]
    # tqdm's bar: "round 1/1 rewrite:  40%|████      | 96/240 [00:01<00:02, 75.3req/s]"
    bars = re.findall(r"round 1/1 \w+: +\d+%\|.*?\| *(\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d", text)
    assert bars, text[-2000:]
    assert any(int(done) < int(planned) for done, planned in bars)
    assert "round 1/1 paraphrase" in text  # the per-stage lines are still written above the bar
