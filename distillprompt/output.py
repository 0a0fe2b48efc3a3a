"""A run's output folder (``--output``, default ``./distillprompt-output/<timestamp>``): what the
run writes there, and what ``--resume FOLDER`` reads back.

* ``state.json``: the checkpoint after every finished round (written atomically), so that a
  killed run loses at most the round in progress, and ``settings_tree.json`` beside it with
  the first one: the settings as recorded (secrets left out, URLs masked);
* ``result.json``, ``candidates.csv`` and ``pareto.png``: at the end, or when an error ends a
  run that has paid for something.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from . import pareto
from .cost import prices_of
from .data import Task
from .engine import Callback, RunResult
from .errors import UserError
from .settings import Settings
from .state import RecordedRun, RunState

SETTINGS_TREE = "settings_tree.json"  # the name MLflow's record uses too
CHECKPOINT = "state.json"
RESULT = "result.json"


def output_folder(settings: Settings) -> Path:
    if settings.output is not None:
        return Path(settings.output).expanduser().resolve()
    return (Path("distillprompt-output") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


def check_output(folder: Path) -> None:
    """Refuses, before the first request, an output folder that cannot be written: the
    folder, or the nearest folder above it that exists (where it would be made), takes a
    file. Nothing is made here: a run stopped by bad data leaves no empty folder behind."""
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(20, "not a folder")
        with tempfile.TemporaryFile(dir=where, prefix=".distillprompt-check-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write result.json to {folder} ({where}: {error.strerror or type(error).__name__}): pass --output "
            "a folder you can write to"
        ) from None


class RunFolder(Callback):
    """Keeps in the output folder what ``--resume FOLDER`` goes on from: the run state after
    every round, and the settings with the first."""

    def __init__(self, folder: Path, settings: Settings) -> None:
        self.folder = folder
        self.settings = settings

    def on_round(self, result: Any) -> None:
        result.state.save(self.folder / CHECKPOINT)
        tree = self.folder / SETTINGS_TREE
        if not tree.exists():
            tree.write_text(json.dumps(self.settings.recorded_tree(), indent=1))


def recorded_in(folder: Path) -> RecordedRun:
    """What a run left in its output folder for ``--resume FOLDER``: its recorded settings and
    its last checkpoint; the resumed run goes on in that folder."""
    try:
        tree = json.loads((folder / SETTINGS_TREE).read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{folder} holds no readable {SETTINGS_TREE}: it is not the output folder of a distillprompt run that "
            "finished a round; check the folder given to --resume, or run the same command again (the response "
            "cache answers what it paid for)"
        ) from None
    tree["output"] = str(folder)
    return RecordedRun(tree, RunState.load(folder / CHECKPOINT))


def write_result(result: RunResult, settings: Settings, task: Task, folder: Path) -> None:
    """``result.json``, ``candidates.csv`` and ``pareto.png`` in the output folder."""
    result.records.settings = settings.public_dict()
    folder.mkdir(parents=True, exist_ok=True)
    prices = prices_of(settings.llm)
    rows = pareto.candidate_rows(result, task, prices.input, prices.output)
    result.records.pareto = {"summary": pareto.summary(rows, len(task.train)),
                             "front": [row["id"] for row in rows if row["on_front"]]}
    (folder / RESULT).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    pareto.write(rows, folder, f"{task.name}: score against prompt length")
