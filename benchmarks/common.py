"""What the benchmarks share: the scripted endpoint in its own process, a whole
`distillprompt optimize` process measured from outside, /proc readings, and a one-node
Ray cluster for the ``ray-cluster`` runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_endpoint(latency: float, capacity: int, faults: list[str], *extra: str) -> tuple[subprocess.Popen, str]:
    """tests/endpoint.py in a process of its own; returns it and its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "tests.endpoint", "--port", str(port), "--latency", str(latency),
               "--capacity", str(capacity), *[f"--fault={fault}" for fault in faults], *extra]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "serving …" once it listens
    if not line.startswith("serving"):
        server.kill()
        raise SystemExit(f"the endpoint did not start: {' '.join(command)}")
    return server, f"http://127.0.0.1:{port}/v1"


def run_against_endpoint(
    endpoint: tuple[float, int, list[str], list[str]], command: Callable[[str], list[str]], folder: Path,
    env: dict[str, str] | None = None,
) -> tuple[Finished, dict[str, Any]]:
    """Starts a fresh endpoint (latency, capacity, faults, extra flags), runs the command it
    makes from the endpoint's URL, and returns the measured process with the endpoint's own
    account of the run."""
    latency, capacity, faults, extra = endpoint
    server, base_url = start_endpoint(latency, capacity, faults, *extra)
    try:
        finished = run_measured(command(base_url), folder, env=env)
        stats = endpoint_stats(base_url)
    finally:
        server.terminate()
        server.wait()
    if finished.exit_code != 0:
        raise SystemExit(f"{' '.join(command(base_url))} failed ({finished.exit_code}): {finished.stderr}")
    return finished, stats


def endpoint_stats(base_url: str) -> dict[str, Any]:
    """The endpoint's own account: requests by kind and status, busy time, idle gaps."""
    with urllib.request.urlopen(f"{base_url}/stats", timeout=30) as reply:
        return json.loads(reply.read())


def proc_stat(pid: int) -> dict | None:
    """ppid, CPU seconds (user + system, own threads) and RSS bytes from /proc/<pid>/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rfind(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    return {
        "name": data[data.find("(") + 1:data.rfind(")")],
        "state": fields[0],
        "ppid": int(fields[1]),
        "cpu": (int(fields[11]) + int(fields[12])) / TICK,
        "children_cpu": (int(fields[13]) + int(fields[14])) / TICK,
        "rss": int(fields[21]) * PAGE,
    }


@dataclass
class Finished:
    """A whole process, measured from outside: wall time from just before it was started to
    its exit, its own CPU time (read from its zombie, so its children's is not in it)."""

    exit_code: int
    wall_s: float
    started: float  # time.time() just before the start
    ended: float
    driver_cpu_s: float
    maxrss_mb: float
    stderr: str
    extra: dict[str, Any] = field(default_factory=dict)


def run_measured(command: list[str], folder: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Finished:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        started_at = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env)
        # Wait for the exit without reaping, to read the process's own CPU time from its zombie.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - started
        ended_at = time.time()
        zombie = proc_stat(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
    return Finished(
        exit_code=os.waitstatus_to_exitcode(status),
        wall_s=wall,
        started=started_at,
        ended=ended_at,
        driver_cpu_s=zombie["cpu"] if zombie else float("nan"),
        maxrss_mb=usage.ru_maxrss / 1024,
        stderr=(folder / "stderr.txt").read_text()[-3000:],
    )


def optimize_command(
    dataset: Path, base_url: str, executor: str, output: Path, *, rounds: int, train_size: int, test_size: int,
    concurrency: str, seed: int = 0, extra: list[str] | None = None,
) -> list[str]:
    return [
        sys.executable, "-m", "distillprompt", "optimize", "--quiet",
        "--dataset", str(dataset), "--base-url", base_url, "--model", "test-model",
        "--rounds", str(rounds), "--train-size", str(train_size), "--test-size", str(test_size),
        "--concurrency", str(concurrency), "--executor", executor, "--no-cache", "--seed", str(seed),
        "--output", str(output), *(extra or []),
    ]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a side-by-side run every benchmark of the throughput issue shares (its
    defaults: 200 ms a request, 2 rounds, train 50, test 20, both executors)."""
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the endpoint holds each request")
    parser.add_argument("--rounds", "--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--repeat", type=int, default=1)
    # the throughput figures were measured with every candidate scored in full
    parser.add_argument("--scoring", default="full", choices=("full", "race"), help="--scoring of the runs")


def run_command(
    args: argparse.Namespace, base_url: str, executor: str, output: Path, concurrency: str, scoring: str | None = None
) -> list[str]:
    """`distillprompt optimize` with the options of ``add_run_arguments``."""
    return optimize_command(
        args.dataset, base_url, executor, output, rounds=args.rounds, train_size=args.train_size,
        test_size=args.test_size, concurrency=concurrency, seed=args.seed,
        extra=["--scoring", scoring or args.scoring],
    )


def read_result(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "result.json").read_text())


def descendants(root: int) -> dict[int, dict]:
    """Every live process under root (root excluded), with its /proc stat."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat["ppid"], []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid]
        todo.extend(children.get(pid, []))
    return found


class HeadNode:
    """A one-node Ray cluster started with ``ray start --head`` (the ``ray-cluster`` run): the
    driver connects to it through RAY_ADDRESS (``driver_env``), as to any existing cluster,
    so the scoring requests go through the actors once they are up. Its worker processes
    are children of its raylet, which load.py polls like the driver's tree."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled")  # a loopback-only cluster
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
        subprocess.run(
            [self.ray, "start", "--head", f"--port={self.port}", f"--num-cpus={os.cpu_count()}", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={self.temp}"],
            env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / "ray-start.txt", "w"),
        )
        found = subprocess.run(["pgrep", "-f", f"raylet.*{self.temp}"], capture_output=True, text=True).stdout.split()
        self.raylet = int(found[0]) if found else None

    @property
    def driver_env(self) -> dict[str, str]:
        """The environment of a run that joins this cluster."""
        return dict(self.env, RAY_ADDRESS=f"127.0.0.1:{self.port}")

    def stop(self) -> None:
        """Ends this cluster's processes only (``ray stop`` would end every Ray process of the
        user on the machine, a test cluster's too): those naming its temp dir, and the
        raylet's descendants (the workers)."""
        named = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True).stdout.split()
        pids = {int(pid) for pid in named} | (set(descendants(self.raylet)) if self.raylet else set())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any((proc_stat(pid) or {"state": "Z"})["state"] != "Z" for pid in pids):
                time.sleep(0.2)


@contextlib.contextmanager
def executor_setup(executor: str, folder: Path) -> Any:
    """The ``--executor`` value, environment and cluster of a run: ``ray-cluster`` is the Ray
    executor joined to a one-node cluster started for the run (``HeadNode``), stopped after
    it; the other executors get neither."""
    if executor != "ray-cluster":
        yield executor, None, None
        return
    folder.mkdir(parents=True, exist_ok=True)
    head = HeadNode(folder)
    try:
        yield "ray", head.driver_env, head
    finally:
        head.stop()
