"""The load requirement: a large run completes with the driver's peak RSS under 1 GB.

A `distillprompt optimize` process with a 2,000-example train sample, 3 rounds and
`--concurrency 128` runs against a fast scripted endpoint (tests/endpoint.py in its own
process, latency 0, no capacity bound), once per executor: ``local`` (in process), ``ray``
(a local instance the run starts at once, ``--ray-start now``; the driver answers while it
starts and after the rounds) and ``ray-cluster`` (a one-node cluster started beforehand with
``ray start --head`` and reached through RAY_ADDRESS: once its actors are up every scoring
request goes through them, the driver-CPU-per-request figure of a driver in front of a
cluster).
Each run gets a fresh endpoint, so runs do not share its request log (it keeps one entry
per request) or its fault sequence.

Reported per run: wall time of the whole process (interpreter start, imports, data loading,
Ray start-up and shutdown included), the optimizer's own wall time (result.json), requests,
requests per second, retries, the driver's peak RSS, and where the CPU time went (driver,
the other processes of its tree, i.e. Ray's, and the endpoint).

The driver's peak RSS is its own VmHWM, polled from /proc while it runs (a lower bound that
misses only growth in the last poll interval), next to ru_maxrss from wait4, which is the
maximum over the driver and every descendant it reaped (an upper bound for the driver
alone). Neither adds up the Ray worker processes: they are separate processes, shown as the
peak of the summed RSS of the whole process tree.

    python benchmarks/load.py                               # local, ray and ray-cluster, clean endpoint
    python benchmarks/load.py --cache                       # with a fresh response cache per run
    python benchmarks/load.py --executors local --fault 429=0.1 --fault 500=0.05 --fault drop=0.05
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DEFAULT_DATA, ROOT, HeadNode, descendants, executor_setup, proc_stat, start_endpoint  # this folder is on sys.path when run as a script

MB = 1024 * 1024


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of one process (VmHWM), in bytes; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


class TreeMonitor(threading.Thread):
    """Polls the driver and its process tree until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.driver_hwm = 0
        self.tree_peak_rss = 0
        self.others_cpu: dict[int, float] = {}  # last CPU seconds seen per descendant
        self.others_name: dict[int, str] = {}
        self.others_peak = 0
        self.rss_samples: list[tuple[float, int]] = []  # (seconds since start, driver RSS bytes)
        self.started = time.perf_counter()

    def poll(self) -> None:
        hwm = vm_hwm(self.pid)
        own = proc_stat(self.pid)
        if hwm is None or own is None or own["state"] == "Z":
            return
        self.driver_hwm = max(self.driver_hwm, hwm)
        self.rss_samples.append((time.perf_counter() - self.started, own["rss"]))
        tree = descendants(self.pid)
        for pid, stat in tree.items():
            self.others_cpu[pid] = stat["cpu"]
            self.others_name[pid] = stat["name"]
        self.others_peak = max(self.others_peak, len(tree))
        self.tree_peak_rss = max(self.tree_peak_rss, own["rss"] + sum(stat["rss"] for stat in tree.values()))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.poll()
            self.stop_event.wait(self.interval)


def run_once(args: argparse.Namespace, executor: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    with executor_setup(executor, folder) as (flag, env, head):
        return measure(args, executor, folder, flag, env, head)


def measure(
    args: argparse.Namespace, executor: str, folder: Path, flag: str, env: dict[str, str] | None, head: HeadNode | None
) -> dict:
    server, base_url = start_endpoint(args.latency, args.capacity, args.fault)
    cluster = TreeMonitor(head.raylet, args.poll) if head and head.raylet else None
    try:
        endpoint_before = proc_stat(server.pid)
        command = optimize_command(args, executor, folder, flag, base_url)
        with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
            started = time.perf_counter()
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=env)
            monitor = TreeMonitor(process.pid, args.poll)
            monitor.start()
            if cluster:
                cluster.start()
            # Wait for the exit without reaping, to read the driver's own CPU time from its zombie.
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - started
            monitor.stop_event.set()
            monitor.join()
            if cluster:
                cluster.poll()  # the actors' last CPU time, before they are stopped
                cluster.stop_event.set()
                cluster.join()
            zombie = proc_stat(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        endpoint_after = proc_stat(server.pid)
        endpoint_hwm = vm_hwm(server.pid)
    finally:
        server.terminate()
        server.wait()
    leftover = [pid for pid in monitor.others_cpu if (proc_stat(pid) or {"state": "Z"})["state"] != "Z"]
    row = {
        "executor": executor,
        "faults": " ".join(args.fault) or "none",
        "exit": process.returncode,
        "wall_s": wall,
        "driver_hwm_mb": monitor.driver_hwm / MB,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "tree_peak_mb": monitor.tree_peak_rss / MB,
        "processes": monitor.others_peak,
        "driver_cpu_s": zombie["cpu"] if zombie else float("nan"),
        "others_cpu_s": sum(monitor.others_cpu.values()) + (sum(cluster.others_cpu.values()) if cluster else 0.0),
        "endpoint_cpu_s": endpoint_after["cpu"] - endpoint_before["cpu"] if endpoint_before and endpoint_after else float("nan"),
        "endpoint_hwm_mb": (endpoint_hwm or 0) / MB,
        "leftover": len(leftover),
        "others_by_name": by_name(
            {**monitor.others_cpu, **(cluster.others_cpu if cluster else {})},
            {**monitor.others_name, **(cluster.others_name if cluster else {})},
        ),
        "rss_timeline_mb": timeline(monitor.rss_samples, wall, 10),
        "stderr": (folder / "stderr.txt").read_text()[-3000:],
        "command": command,
    }
    result_file = folder / "out" / "result.json"
    if process.returncode == 0 and result_file.exists():
        row.update(result_figures(json.loads(result_file.read_text())))
    return row


def optimize_command(args: argparse.Namespace, executor: str, folder: Path, flag: str, base_url: str) -> list[str]:
    return [
        sys.executable, "-m", "distillprompt", "optimize", "--quiet",
        "--dataset", str(args.dataset), "--base-url", base_url, "--model", "test-model",
        "--rounds", str(args.rounds), "--train-size", str(args.train_size), "--test-size", str(args.test_size),
        "--concurrency", str(args.concurrency), "--executor", flag,
        *(["--cache-path", str(folder / "cache.sqlite")] if args.cache else ["--no-cache"]),
        "--seed", str(args.seed), "--scoring", args.scoring,
        # the actors' path from the start (by default a local instance waits for 5 busy seconds)
        *(["--ray-start", "now"] if executor == "ray" else []),
        "--output", str(folder / "out"),
    ]


def result_figures(result: dict) -> dict:
    """What a finished run's result.json says of it."""
    total = result["usage"]["total"]
    return dict(
        requests=total["requests"],
        retries=total["retries"],
        failed=total["failed"],
        optimizer_s=result["wall_time_seconds"],
        rounds=len(result["rounds"]),
        candidates=len(result["history"]),
        final_prompt=result["final_prompt"],
        final_test=result["final_scores"]["test"]["score"],
        by_actors=result.get("ray", {}).get("requests", {}).get("actors"),
        ray_calls=result.get("ray", {}).get("calls"),
        cache_writes=result.get("cache", {}).get("write_transactions"),
        stop_reason=result.get("stop_reason"),
    )


def by_name(cpu: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of the driver's descendants, summed by process name, largest first."""
    totals: dict[str, float] = {}
    for pid, seconds in cpu.items():
        totals[names[pid]] = totals.get(names[pid], 0.0) + seconds
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def timeline(samples: list[tuple[float, int]], wall: float, points: int) -> list[float]:
    """The driver's RSS (MB) last seen at 1/points, 2/points, … of the run."""
    values = []
    for k in range(1, points + 1):
        seen = [rss for at, rss in samples if at <= wall * k / points]
        values.append(seen[-1] / MB if seen else 0.0)
    return values


def fmt(value: object, pattern: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "?"
    return pattern.format(value)


def main() -> None:
    args = arguments()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        base = args.keep or Path(temp)
        for attempt in range(args.repeat):
            for executor in args.executors.split(","):
                row = run_once(args, executor, base / f"{attempt}-{executor}")
                rows.append(row)
                state = "ok" if row["exit"] == 0 else f"FAILED (exit {row['exit']})"
                print(f"{executor}: {state} in {row['wall_s']:.1f}s", file=sys.stderr, flush=True)

    over = print_tables(args, rows)
    print_notes(args, rows)
    sys.exit(1 if over else 0)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds the endpoint waits per request")
    parser.add_argument("--capacity", type=int, default=0, help="requests the endpoint serves at once (0: no bound)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--rounds", "--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executors", default="local,ray,ray-cluster",
                        help="local, ray (a local instance the run starts) and ray-cluster (an existing one-node cluster)")
    parser.add_argument("--repeat", type=int, default=1)
    # the load figures were measured with every candidate scored in full
    parser.add_argument("--scoring", default="full", choices=("full", "race"), help="--scoring of the runs")
    parser.add_argument("--cache", action="store_true",
                        help="a fresh response cache per run (default --no-cache); reports its write transactions")
    parser.add_argument("--fault", action="append", default=[], help="endpoint fault rate NAME=RATE, e.g. 429=0.1 (repeatable)")
    parser.add_argument("--rss-limit-mb", type=float, default=1024, help="the requirement on the driver's peak RSS")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between two polls of /proc")
    parser.add_argument("--keep", type=Path, default=None, help="keep outputs and logs in this folder instead of a temp dir")
    return parser.parse_args()


def print_tables(args: argparse.Namespace, rows: list[dict]) -> bool:
    """The two tables: time, requests and memory; CPU by process. Whether any run failed or
    went over the RSS limit."""
    print(
        f"latency {args.latency}s, endpoint capacity {args.capacity or 'unbounded'}, --concurrency {args.concurrency}, "
        f"{args.rounds} rounds, train {args.train_size}, test {args.test_size}, faults: {' '.join(args.fault) or 'none'}, "
        f"{os.cpu_count()} cores"
    )
    print()
    print("| executor | completed | wall s | optimizer s | requests | req/s | retries | failed | "
          f"driver peak RSS MB | wait4 maxrss MB | < {args.rss_limit_mb:.0f} MB | tree peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    over = False
    for row in rows:
        completed = "yes" if row["exit"] == 0 and "requests" in row else f"no (exit {row['exit']})"
        # Without descendants, wait4's ru_maxrss is the driver's own peak; else the polled VmHWM is.
        peak = max(row["driver_hwm_mb"], row["maxrss_mb"]) if row["processes"] == 0 else row["driver_hwm_mb"]
        within = peak < args.rss_limit_mb
        over |= not within or row["exit"] != 0
        requests = row.get("requests")
        print(
            f"| {row['executor']} | {completed} | {row['wall_s']:.1f} | {fmt(row.get('optimizer_s'))} | {fmt(requests, '{}')} | "
            f"{fmt(requests / row['wall_s'] if requests else None, '{:.0f}')} | {fmt(row.get('retries'), '{}')} | "
            f"{fmt(row.get('failed'), '{}')} | {row['driver_hwm_mb']:.0f} | {row['maxrss_mb']:.0f} | "
            f"{'yes' if within else 'NO'} | {row['tree_peak_mb']:.0f} |"
        )
    print()
    print("| executor | driver CPU s | driver CPU ms / request | other processes CPU s (peak count) | endpoint CPU s | "
          "endpoint peak RSS MB | (driver + endpoint CPU) / wall | via Ray actors | Ray calls | final test score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        busy = (row["driver_cpu_s"] + row["endpoint_cpu_s"]) / row["wall_s"]
        per_request = 1000 * row["driver_cpu_s"] / row["requests"] if row.get("requests") else None
        print(
            f"| {row['executor']} | {fmt(row['driver_cpu_s'])} | {fmt(per_request, '{:.2f}')} | "
            f"{row['others_cpu_s']:.1f} ({row['processes']}) | "
            f"{fmt(row['endpoint_cpu_s'])} | {row['endpoint_hwm_mb']:.0f} | {busy:.2f} | "
            f"{fmt(row.get('by_actors'), '{}')} | {fmt(row.get('ray_calls'), '{}')} | {fmt(row.get('final_test'), '{:.4f}')} |"
        )
    return over


def print_notes(args: argparse.Namespace, rows: list[dict]) -> None:
    """The driver's RSS over time, its descendants' CPU, the cache's writes, and failures."""
    print()
    print("driver RSS MB at 10 %, 20 %, … 100 % of each run's wall time:")
    for row in rows:
        print(f"  {row['executor']}: " + " ".join(f"{value:.0f}" for value in row["rss_timeline_mb"]))
    if any(row["others_by_name"] for row in rows):
        print("CPU s of the driver's descendants, by process name:")
        for row in rows:
            if row["others_by_name"]:
                print(f"  {row['executor']}: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in row["others_by_name"].items()))
    if args.cache:
        print("response cache write transactions (each commits the replies of one turn of the event loop):")
        for row in rows:
            print(f"  {row['executor']}: {fmt(row.get('cache_writes'), '{}')} for {fmt(row.get('requests'), '{}')} replies")
    completed = [row for row in rows if "final_prompt" in row]
    if completed:
        print(f"same final prompt in every completed run: {len({row['final_prompt'] for row in completed}) == 1}")
    leftovers = sum(row["leftover"] for row in rows)
    if leftovers:
        print(f"processes of the driver's tree still alive after it exited: {leftovers}")
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"this benchmark's own CPU (polling /proc): {own.ru_utime + own.ru_stime:.1f}s")
    for row in rows:
        if row["exit"] != 0 or "requests" not in row:
            print(f"\n{row['executor']} run failed: {' '.join(row['command'])}\n{row['stderr']}")


if __name__ == "__main__":
    main()
