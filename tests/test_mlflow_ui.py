"""The MLflow UI, rendered by headless Chromium, shows what `mlflow run -e optimize` recorded:
both runs on the experiment's runs page and the registered prompt on the prompts pages; and
what `distillprompt compare` recorded: a parent run listing its children and the table.

The MLflow 3.17 UI is a single-page app, so the pages are rendered with
`chromium --headless --virtual-time-budget=... --dump-dom` and the visible text of the DOM
is searched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import ROOT, venv_env
from tests.endpoint import ScriptedEndpoint

CHROMIUM = shutil.which("chromium")
EXPERIMENT = "ui-check"
PROMPT_NAME = "ui-reviews"
NEVER_CREATED_RUN = "never-created-run-4711"
NEVER_REGISTERED_PROMPT = "never-registered-prompt-4711"

if CHROMIUM is None and os.environ.get("REQUIRE_BROWSER"):  # set by tests/run.sh, which installs it
    raise RuntimeError("the MLflow UI tests need Chromium: apt-get install -y chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")


class _VisibleText(HTMLParser):
    """Collects the text nodes of a document, leaving out <script>, <style> and <noscript>."""

    HIDDEN = {"script", "style", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.HIDDEN and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth and data.strip():
            self.texts.append(" ".join(data.split()))


def visible_texts(url: str, profile: Path) -> list[str]:
    """The text nodes of `url` once the single-page app has rendered it."""
    profile.mkdir(parents=True)
    completed = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--window-size=1600,1000", "--virtual-time-budget=20000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=60, cwd=profile,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    parser = _VisibleText()
    parser.feed(completed.stdout)
    return parser.texts


def optimize(server: dict, endpoint: ScriptedEndpoint, dataset: Path, seed: int) -> None:
    command = [
        str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "optimize", "--env-manager", "local",
        "--experiment-name", EXPERIMENT,
        "-P", f"dataset={dataset}", "-P", f"base_url={endpoint.base_url}", "-P", "model=test-model",
        "-P", "executor=local", "-P", "epochs=2", "-P", "train_size=12", "-P", "test_size=10",
        "-P", f"seed={seed}", "-P", f"prompt_name={PROMPT_NAME}",
    ]
    env = venv_env({"MLFLOW_TRACKING_URI": server["uri"], "OPENAI_API_KEY": "sk-ui-check"})
    env["DISTILLPROMPT_CACHE__ENABLED"] = "false"
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.fixture(scope="module")
def two_runs(mlflow_server, reviews_dir):
    import mlflow

    with ScriptedEndpoint() as endpoint:
        for seed in (3, 11):
            optimize(mlflow_server, endpoint, reviews_dir, seed)
    mlflow.set_tracking_uri(mlflow_server["uri"])
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list",
                              order_by=["start_time ASC"])
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    return {"experiment_id": experiment.experiment_id, "runs": runs}


def test_runs_page_lists_both_runs(two_runs, mlflow_server, tmp_path):
    names = [run.info.run_name for run in two_runs["runs"]]
    assert len(set(names)) == 2 and all(names)
    texts = visible_texts(f"{mlflow_server['uri']}/#/experiments/{two_runs['experiment_id']}/runs", tmp_path / "runs")
    for name in names:
        assert name in texts, f"run {name!r} is not on the rendered runs page: {texts[:80]}"
    assert NEVER_CREATED_RUN not in texts


def test_prompts_page_shows_the_registered_prompt(two_runs, mlflow_server, tmp_path):
    uri = mlflow_server["uri"]
    listing = visible_texts(f"{uri}/#/prompts", tmp_path / "prompts")
    assert PROMPT_NAME in listing, f"prompt {PROMPT_NAME!r} is not on the rendered prompts page: {listing[:80]}"
    # the "Latest version" column of its row: one version per run
    assert listing[listing.index(PROMPT_NAME) + 1] == "Version 2", listing
    assert NEVER_REGISTERED_PROMPT not in listing

    detail = visible_texts(f"{uri}/#/prompts/{PROMPT_NAME}", tmp_path / "detail")
    assert "Page Not Found" not in detail, detail[:80]
    assert {"Version 1", "Version 2"} <= set(detail), detail
    assert two_runs["runs"][-1].info.run_id in " ".join(detail)  # version 2's run_id tag

    missing = visible_texts(f"{uri}/#/prompts/{NEVER_REGISTERED_PROMPT}", tmp_path / "missing")
    assert "Page Not Found" in missing and "Version 1" not in missing, missing[:80]


def test_compare_parent_page_lists_its_children_and_shows_the_table(mlflow_server, reviews_dir, tmp_path):
    import mlflow

    with ScriptedEndpoint() as endpoint:
        completed = subprocess.run(
            [sys.executable, "-m", "distillprompt", "compare", "--methods", "initial,fewshot", "--seeds", "2",
             "--dataset", str(reviews_dir), "--base-url", endpoint.base_url, "--model", "test-model",
             "--executor", "local", "--train-size", "12", "--test-size", "10", "--experiment", "ui-compare",
             "--no-cache", "--quiet"],
            capture_output=True, text=True, env=venv_env({"MLFLOW_TRACKING_URI": mlflow_server["uri"]}), cwd=ROOT,
            timeout=600,
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    parent_id = completed.stdout.strip().splitlines()[-1].split()[-1]
    experiment_id = mlflow.MlflowClient(mlflow_server["uri"]).get_run(parent_id).info.experiment_id
    texts = visible_texts(f"{mlflow_server['uri']}/#/experiments/{experiment_id}/runs/{parent_id}", tmp_path / "parent")
    assert "Child runs" in texts, texts[:80]
    page = " ".join(texts)
    for child in ("initial-seed0", "initial-seed1", "fewshot-seed0", "fewshot-seed1"):
        assert child in page, f"child run {child!r} is not on the parent's page"
    assert "test macro-F1 (mean ± std)" in page  # the description renders the comparison table
    fewshot_row = next(line for line in completed.stdout.splitlines() if line.startswith("| fewshot | 2 |"))
    assert fewshot_row.split("|")[3].strip() in page  # its mean ± std, as printed
