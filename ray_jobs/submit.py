"""``distillprompt submit``: run an optimization on a remote Ray cluster as a Ray Job.

The run's settings travel as a config file in the job's working directory, with this
package beside it (``py_modules``); the entry point is ``python -m distillprompt optimize
--config …`` on the cluster, where Ray Jobs sets ``RAY_ADDRESS`` so that scoring uses the
cluster's actors. The API key is never part of the job: set ``OPENAI_API_KEY`` on the
cluster's nodes; nor are the credentials of an endpoint's URL (the job holds it masked): set
their ``DISTILLPROMPT_…`` variable there (``DISTILLPROMPT_LLM__BASE_URL``), which wins over the
job's config file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distillprompt.errors import UserError
from distillprompt.settings import Settings, setting_specs
from distillprompt.urls import masked

from .cluster import PACKAGE_DIRS

CONFIG_NAME = "distillprompt-job.json"
MAX_SHIPPED_BYTES = 50 * 2**20


def job_address(explicit: str | None) -> str:
    """The Jobs API address: the flag, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    for value in (explicit, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value and value.startswith(("http://", "https://")):
            return value.rstrip("/")
    raise UserError(
        "no Ray Jobs address: pass --job-address http://HEAD:8265 (the dashboard) or set RAY_API_SERVER_ADDRESS"
    )


def job_config(settings: Settings) -> dict[str, Any]:
    """The run's settings as recorded (no secret, URLs masked), without where this machine
    would run them."""
    config = settings.recorded_tree()
    del config["ray_address"]
    config["executor"] = "ray"
    return config


def _ship_dataset(config: dict[str, Any], workdir: Path) -> None:
    """A local dataset travels with the job (the cluster cannot see this machine's disk)."""
    dataset = config["data"].get("dataset")
    source = Path(dataset).expanduser() if dataset else None
    if source is None or not source.exists():
        return  # a hub id, or a path that exists on the cluster
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if size > MAX_SHIPPED_BYTES:
        raise UserError(
            f"dataset {source} is {size // 2**20} MiB, too large to send with the job: put it where the cluster can "
            "read it (a hub id or a shared path) and pass that as --dataset"
        )
    target = workdir / "data" / source.name
    if source.is_file():
        target.parent.mkdir(parents=True)
        shutil.copy2(source, target)
    else:
        shutil.copytree(source, target)
    config["data"]["dataset"] = str(Path("data") / source.name)


def build_job(settings: Settings, workdir: Path, python: str = "python") -> tuple[str, dict[str, Any]]:
    config = job_config(settings)
    _ship_dataset(config, workdir)
    (workdir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    # The job runs from a private copy of its working directory: when the entry point joins
    # the cluster, Ray may replace its cached copy of the working directory, which would pull
    # the data and the current directory from under a running job.
    entrypoint = (
        'copy="$(mktemp -d)" && cp -r . "$copy" && cd "$copy" && '
        f"{shlex.quote(python)} -m distillprompt optimize --config {CONFIG_NAME}"
    )
    runtime_env = {
        "working_dir": str(workdir),
        "py_modules": [str(path) for path in PACKAGE_DIRS],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    return entrypoint, runtime_env


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit(settings: Settings, address: str, *, follow: bool = True, python: str = "python") -> int:
    """Submits the run, prints the job id, follows its logs; returns 0 if the job succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as error:
        reason = masked(" ".join(str(error).split()))[:200]
        raise UserError(f"cannot reach the Ray Jobs API at {masked(address)} ({reason}): check --job-address") from None
    with tempfile.TemporaryDirectory(prefix="distillprompt-job-") as folder:
        entrypoint, runtime_env = build_job(settings, Path(folder), python)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"tool": "distillprompt"})
    print(f"submitted Ray job {job_id} to {masked(address)}", flush=True)
    if not follow:
        return 0
    asyncio.run(_follow(client, job_id))  # the log stream ends with the job
    status = client.get_job_status(job_id)
    while not JobStatus(status).is_terminal():
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        print(f"Ray job {job_id}: {status}", flush=True)
        return 0
    # the run's own exit code where Ray kept it: 2 (a fix) and 3 (finished, but its MLflow
    # record is incomplete) tell a pipeline more than the job's FAILED
    code = getattr(client.get_job_info(job_id), "driver_exit_code", None)
    print(f"Ray job {job_id}: {status}" + (f" (exit code {code})" if code is not None else ""), flush=True)
    return code if code in (2, 3) else 1


class SubmitCommand:
    """The ``submit`` subcommand, plugged into the CLI through an entry point."""

    name = "submit"
    help = "run an optimization on a Ray cluster as a Ray Job"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--job-address",
            help="Ray Jobs API of the cluster, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
        )
        parser.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
        parser.add_argument("--job-python", default="python", help="Python on the cluster that runs the job")

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        address = job_address(args.job_address)
        if settings.llm.api_key is not None:
            print(
                "note: the API key is not sent with the job; the cluster's nodes must have OPENAI_API_KEY set",
                file=sys.stderr,
            )
        values = settings.model_dump()
        for spec in setting_specs():
            value = (values[spec.group] if spec.group else values)[spec.name] if spec.url else None
            if value and masked(value) != value and spec.name != "ray_address":  # the job gets the cluster's
                print(f"note: the credentials in {spec.flag} are not sent with the job (it holds {masked(value)}); "
                      f"the cluster's nodes must have {spec.env} set to the URL with them", file=sys.stderr)
        return submit(settings, address, follow=not args.no_follow, python=args.job_python)
