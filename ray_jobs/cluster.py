"""Connecting to Ray: a local instance sized to this machine, or an existing cluster."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from distillprompt.errors import UserError
from distillprompt.urls import masked

log = logging.getLogger(__name__)

PACKAGE_DIRS = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "distillprompt"]


@dataclass(frozen=True)
class Connection:
    address: str | None  # None: a local instance this process started
    owned: bool  # this process called ray.init, so it also shuts down



def connect(address: str | None) -> Connection:
    """Joins the cluster at ``address``, or starts a local instance (loopback only, no dashboard).

    A local instance gets as many CPUs as this machine has; scoring actors ask for none, so
    their number is set by the pool, not by the cores.
    """
    import ray

    if ray.is_initialized():
        return Connection(address, owned=False)
    common = dict(configure_logging=True, logging_level=logging.ERROR, log_to_driver=False)
    if address:
        # Actors need this package on every node: send it along, unless this process is a
        # Ray Job's entry point, whose runtime env already carries it.
        inside_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        runtime_env = {} if inside_job else {"runtime_env": {"py_modules": [str(path) for path in PACKAGE_DIRS]}}
        try:
            ray.init(address=address, **runtime_env, **common)
        except Exception as error:  # ConnectionError, RuntimeError, TimeoutError… depending on the address form
            reason = masked(" ".join(str(error).split()))[:200]
            raise UserError(
                f"cannot connect to the Ray cluster at {masked(address)} ({reason}): check --ray-address / RAY_ADDRESS, "
                "or use --executor local"
            ) from None
        return Connection(address, owned=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        # loopback only: no public argument of ray.init chooses the address a local instance
        # binds (asked for in ray-project/ray#22732), so Ray's underscore one, on purpose
        _node_ip_address="127.0.0.1",
        **common,
    )
    return Connection(None, owned=True)


def disconnect(connection: Connection) -> None:
    import ray

    if connection.owned and ray.is_initialized():
        ray.shutdown()
