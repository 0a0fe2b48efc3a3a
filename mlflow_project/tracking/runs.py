"""An MLflow run's life: which run a distillprompt run records into (its own, the one
``mlflow run`` made, a child of a comparison, or the run being resumed), and what a resumed
run starts again from."""

from __future__ import annotations

import os
from typing import Any

from distillprompt.errors import UserError
from distillprompt.output import SETTINGS_TREE
from distillprompt.settings import Settings
from distillprompt.state import RecordedRun, RunState
from distillprompt.urls import mask_log_lines, masked

from .outbox import error_line, unanswered

CHECKPOINT = "checkpoints/state.json"


def tracking_requested(settings: Settings) -> bool:
    return bool(settings.mlflow.tracking_uri or os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_TRACKING_URI"))


def connect(settings: Settings) -> Any:
    """mlflow, pointed at the settings' tracking store, which answers (else one line with the fix)."""
    import mlflow

    if settings.mlflow.tracking_uri:
        mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    uri = mlflow.get_tracking_uri()
    mask_log_lines("mlflow")  # MLflow's warnings name the URL they called
    if masked(uri) != uri:  # nor does MLflow print the run's address with the URI's credentials
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        bound_http_retries()
    return mlflow


# MLflow's defaults (7 retries, back-off factor 2, 120 s timeout) hold one call of a server
# that went away for minutes; the tracker stops calling after the first failure, so a few
# seconds is what losing the server should cost. A value the user set is kept.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def bound_http_retries() -> None:
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def start_run(mlflow: Any, settings: Settings, parent_run_id: str | None, run_name: str | None) -> Any:
    """The active run this distillprompt run records into."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    try:
        if settings.resume:
            run = mlflow.start_run(run_id=settings.resume)
            if run_id and run_id != settings.resume:  # `mlflow run` made a run of its own: point it here
                mlflow.MlflowClient().set_tag(run_id, "distillprompt.resumed_run", settings.resume)
            # tagged once the resume is accepted (the settings resolved), when the run is taken up again
            state = last_checkpoint(mlflow, settings.resume)
            mlflow.MlflowClient().set_tag(settings.resume, "distillprompt.resumed_from_round",
                                          state.round if state else 0)
            return run
        if parent_run_id:  # a child of a comparison (created by id: MLFLOW_RUN_ID names the parent)
            parent = mlflow.get_run(parent_run_id)
            child = mlflow.MlflowClient().create_run(
                parent.info.experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id}
            )
            return mlflow.start_run(run_id=child.info.run_id, nested=True)
        if run_id:
            return mlflow.start_run(run_id=run_id)
        mlflow.set_experiment(settings.mlflow.experiment)
        return mlflow.start_run(run_name=settings.mlflow.run_name)
    except UserError:
        raise
    except Exception as error:
        reason = masked(" ".join(str(error).split()))[:200]
        raise UserError(
            f"cannot reach the MLflow tracking store {masked(mlflow.get_tracking_uri())} ({reason}): start the server or "
            "fix --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None


def resume_point(given: Settings) -> RecordedRun:
    """Entry point ``distillprompt.resume_sources: mlflow``: the settings the run ``--resume``
    names recorded and its last checkpoint (``resolution.resumed_settings`` puts the
    operational ones given again in their place); a checkpoint it cannot read is refused,
    never started over."""
    if not tracking_requested(given):
        raise UserError("--resume needs MLflow tracking: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    # the record is read in a moment: no download progress bars before the run's own display
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow = connect(given)
    where = masked(mlflow.get_tracking_uri())
    try:
        artifacts = mlflow.get_run(given.resume).info.artifact_uri
    except Exception:
        raise UserError(f"there is no MLflow run {given.resume} at {where}: check the run id given to --resume") from None
    try:
        tree = mlflow.artifacts.load_dict(f"{artifacts}/{SETTINGS_TREE}")
    except Exception:
        raise UserError(
            f"run {given.resume} has no recorded settings ({SETTINGS_TREE}): it was not started by distillprompt; "
            "check the run id given to --resume"
        ) from None
    tree["output"] = None  # a folder of its own, unless --output is given again: the first run's result.json stays
    tree["mlflow"]["tracking_uri"] = given.mlflow.tracking_uri  # where the run was found
    return RecordedRun(tree, last_checkpoint(mlflow, given.resume), tracked_run=given.resume)


def last_checkpoint(mlflow: Any, run_id: str) -> RunState | None:
    """The run's last checkpoint; None when it has none (stopped before its first round
    finished: it starts again, from the cache)."""
    folder = CHECKPOINT.rpartition("/")[0]
    try:
        listed = [entry.path for entry in mlflow.MlflowClient().list_artifacts(run_id, folder)]
        if CHECKPOINT not in listed:
            return None
        text = mlflow.artifacts.load_text(f"{mlflow.get_run(run_id).info.artifact_uri}/{CHECKPOINT}")
    except Exception as error:  # noqa: BLE001 - whatever the store or the network did
        raise UserError(
            f"cannot read the checkpoint {CHECKPOINT} of run {run_id} ({error_line(error)}): check the tracking "
            "server and run the same --resume again"
        ) from None
    return RunState.from_json(text)


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer fails the run at once, not after MLflow's own
    minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    reason = unanswered(uri, timeout=10)
    if reason is not None:
        raise UserError(
            f"cannot reach the MLflow tracking server {masked(uri)} ({masked(reason)}): start it or fix "
            "--tracking-uri / MLFLOW_TRACKING_URI"
        )
