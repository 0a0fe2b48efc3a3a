"""A two-node Ray cluster on this machine, started and stopped with the ``ray`` CLI, and a run
scored by a Ray pool's actors alone."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _above_ephemeral() -> int:
    """The first port above the kernel's ephemeral range (outgoing connections take ports there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1]) + 1
    except (OSError, ValueError, IndexError):
        return 61000


def _port_block(size: int) -> int:
    """The first port of ``size`` free consecutive ports, above the ephemeral range.

    Ray's worker processes bind ports of the given ranges; a port that an outgoing connection
    of an earlier test holds makes the worker fail to start, and its actor restart elsewhere.
    """
    low = _above_ephemeral()
    if low + size > 65535:
        low = 20000  # a machine whose ephemeral range reaches the top
    for _ in range(200):
        base = random.randrange(low, 65535 - size)
        if all(_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free port block")


@dataclass
class TwoNodeCluster:
    head_port: int
    dashboard_port: int
    temp_dir: str
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    @property
    def job_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(cls) -> TwoNodeCluster:
        base = _port_block(1200)
        temp_dir = f"/tmp/rt{os.getpid()}"
        # not this process's MLFLOW_*/DISTILLPROMPT_*/OPENAI_* (mlflow.set_tracking_uri in an
        # earlier test exports one): a job on the cluster would inherit a server since stopped
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLPROMPT_", "OPENAI_", "MLFLOW_"))}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cluster = cls(base, base + 1, temp_dir, env)
        head = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={base}",
            "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 1}",
            f"--ray-client-server-port={base + 2}", f"--dashboard-agent-listen-port={base + 3}",
            f"--min-worker-port={base + 100}", f"--max-worker-port={base + 599}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ]
        worker = [
            RAY, "start", f"--address=127.0.0.1:{base}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            '--resources={"second_node": 1}', f"--dashboard-agent-listen-port={base + 4}",
            f"--min-worker-port={base + 600}", f"--max-worker-port={base + 1099}", "--disable-usage-stats",
        ]
        for command in (head, worker):
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        cluster.wait_for_nodes(2)
        cluster.wait_for_scheduling()
        return cluster

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = subprocess.run(
                [RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True, timeout=60
            )
            if status.stdout.count(" node_") >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} nodes")

    def wait_for_scheduling(self, timeout: float = 60) -> None:
        """Wait until a driver on the head node places work on the worker node.

        ``ray status`` lists a node as soon as it has registered, while the head's scheduler
        learns of it a moment later; a soft node-affinity placement made in between falls
        back to the head.
        """
        probe = (
            "import sys, time, ray\n"
            "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "worker = next(n['NodeID'] for n in ray.nodes() if n['Alive'] and 'second_node' in n['Resources'])\n"
            "where = lambda: ray.get_runtime_context().get_node_id()\n"
            "deadline = time.monotonic() + float(sys.argv[2])\n"
            "while time.monotonic() < deadline:\n"
            "    task = ray.remote(num_cpus=0)(where).options(scheduling_strategy=Affinity(worker, soft=True))\n"
            "    if ray.get(task.remote()) == worker:\n"
            "        sys.exit(0)\n"
            "    time.sleep(0.5)\n"
            "sys.exit(1)\n"
        )
        done = subprocess.run([sys.executable, "-c", probe, self.address, str(timeout)], env=self.env,
                              capture_output=True, text=True, timeout=timeout + 60)
        if done.returncode:
            raise RuntimeError(f"the head never placed work on the worker node: {done.stderr[-2000:]}")

    def actors_report(self) -> str:
        """Ray's own account of the cluster's actors (node, state, restarts, death cause), for a failure message."""
        listed = subprocess.run(
            [RAY, "list", "actors", "--detail", f"--address={self.job_address}"], env=self.env, capture_output=True,
            text=True, timeout=60,
        )
        return (listed.stdout + listed.stderr)[-6000:]

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def optimize_on_actors(settings):
    """A run whose scoring requests all go to the pool's actors (up before it starts): its
    result and the requests by who sent them."""
    import asyncio

    from distillprompt import runner
    from ray_jobs.executor import RayExecutor

    async def on_ray():
        executor = RayExecutor(settings)
        try:
            await executor.placement()  # the actors are up: they answer every scoring request
            return (await runner.optimize(settings, executor=executor))[0], dict(executor.answered)
        finally:
            await executor.aclose()

    return asyncio.run(on_ray())
