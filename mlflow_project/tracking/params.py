"""Settings as MLflow params, the one way every entry point logs them, and the samples as
MLflow datasets.

A run may hold params already: ``mlflow run`` logs the MLproject's parameters as given (an
empty one leaves the setting to the config file, the environment or the default), and a
resumed run holds its first values. MLflow keeps a param's first value and refuses another,
so the value used goes in as ``effective_<name>`` beside the given one, and a later resume's
different value as a tag. Every value in full goes to an artifact too: a param holds at most
MLflow's 6,000 characters.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from distillprompt.data import Task

PARAM_LIMIT = 6000  # MLflow's longest param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def param_text(value: Any) -> str:
    return "" if value is None else json.dumps(value) if isinstance(value, list) else str(value)


def log_settings(mlflow: Any, run_id: str, params: dict[str, Any], *, prefix: str = "",
                 artifact: str = "settings.json") -> None:
    """Logs ``params`` (the effective settings and what the run adds) on run ``run_id``:
    new names as given, names the run holds already as ``effective_<name>`` (see above), and
    every value in full in ``artifact``. ``prefix`` keeps them apart from a user's own
    params (``optimize_prompts`` logs into the caller's run)."""
    values = {f"{prefix}{name}": param_text(value) for name, value in params.items()}
    run = mlflow.get_run(run_id)
    existing = run.data.params
    from_project = "mlflow.project.entryPoint" in run.data.tags  # the tag `mlflow run` sets
    fresh, changed = {}, {}
    for name, value in values.items():
        if name not in existing:
            fresh[name] = value
        elif not from_project and existing[name] == value:
            continue
        elif f"effective_{name}" not in existing:
            fresh[f"effective_{name}"] = value
        elif existing[f"effective_{name}"] != value:
            # a second --resume with another value (an output folder): MLflow keeps a param's
            # first value, so the latest goes in a tag (the artifact holds them all)
            changed[f"distillprompt.resumed.{name}"] = value
    if fresh:
        mlflow.log_params({name: value[:PARAM_LIMIT] for name, value in fresh.items()})
    if changed:
        mlflow.set_tags(changed)
    mlflow.log_dict(values, artifact)


def log_datasets(mlflow: Any, task: Task) -> None:
    """The train, validation and test samples as MLflow dataset inputs of the active run."""
    import mlflow.data
    import pandas

    for context, examples in (("train", task.train), ("validation", task.val), ("test", task.test)):
        if not examples:
            continue
        frame = pandas.DataFrame([{**e.inputs, task.label_column: e.target} for e in examples])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a local path "can be interpreted in multiple ways"
            dataset = mlflow.data.from_pandas(
                frame, source=task.source, name=f"{task.name}-{context}", targets=task.label_column
            )
        mlflow.log_input(dataset, context=context)
