"""An MLflow run's life: which run a distillprompt run records into (its own, the one
``mlflow run`` made, a child of a comparison, or the run being resumed), and what a resumed
run starts again from."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

from distillprompt.errors import UserError
from distillprompt.runner import ResumePoint
from distillprompt.settings import Settings, load_settings
from distillprompt.state import RunState

CHECKPOINT = "checkpoints/state.json"
SETTINGS_TREE = "settings_tree.json"  # the settings as a tree, secrets left out: what --resume restarts from


def tracking_requested(settings: Settings) -> bool:
    return bool(settings.mlflow.tracking_uri or os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_TRACKING_URI"))


def connect(settings: Settings) -> Any:
    """mlflow, pointed at the settings' tracking store, which answers (else one line with the fix)."""
    import mlflow

    if settings.mlflow.tracking_uri:
        mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    uri = mlflow.get_tracking_uri()
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
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(
            f"cannot reach the MLflow tracking store {mlflow.get_tracking_uri()} ({reason}): start the server or fix "
            "--tracking-uri / MLFLOW_TRACKING_URI"
        ) from None


def resume_point(given: Settings) -> ResumePoint:
    """Entry point ``distillprompt.resume_sources: mlflow``: the settings the run ``--resume``
    names started with (secrets from this environment) and its last checkpoint."""
    if not tracking_requested(given):
        raise UserError("--resume needs MLflow tracking: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    mlflow = connect(given)
    try:
        artifacts = mlflow.get_run(given.resume).info.artifact_uri
    except Exception:
        raise UserError(f"there is no MLflow run {given.resume} at {mlflow.get_tracking_uri()}: check the run id given to --resume") from None
    try:
        tree = mlflow.artifacts.load_dict(f"{artifacts}/{SETTINGS_TREE}")
    except Exception:
        raise UserError(
            f"run {given.resume} has no recorded settings ({SETTINGS_TREE}): it was not started by distillprompt; "
            "check the run id given to --resume"
        ) from None
    if tree["llm"].get("backend") == "local":
        tree["llm"]["base_url"] = None  # the embedded server of the killed run is gone; a new one starts
    tree["resume"] = given.resume
    tree["output"] = str(given.output) if given.output else None
    settings = load_settings(tree)
    try:
        state: RunState | None = RunState.from_dict(mlflow.artifacts.load_dict(f"{artifacts}/{CHECKPOINT}"))
    except Exception:
        state = None  # killed before its first round finished: it starts again, from the cache
    mlflow.MlflowClient().set_tag(given.resume, "distillprompt.resumed_from_round", state.round if state else 0)
    return ResumePoint(settings, state)


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer fails the run at once, not after MLflow's own
    minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers (a server with another health route, or auth in front): let MLflow tell
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(
            f"cannot reach the MLflow tracking server {uri} ({reason}): start it or fix --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None
