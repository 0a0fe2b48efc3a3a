"""Wall time of a whole `distillprompt optimize` process against a slow endpoint, next to the
ideal time, for the in-process and the Ray executor side by side.

The endpoint (tests/endpoint.py, in its own process) waits a fixed latency per request and
serves at most C requests at once. The ideal time of a run is

    latency × (meta-requests that must run one after another + scoring requests / C)

where each round has 5 meta-requests in a chain (rewrite, distill, compress, aggregate,
paraphrase; the requests within a stage run side by side). Everything the process does is
counted: interpreter start, imports, data loading, Ray start-up and shutdown.

    python benchmarks/scoring_throughput.py            # the defaults of the Ray issue
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
STAGES_PER_ROUND = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_endpoint(latency: float, capacity: int, faults: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tests.endpoint", "--port", str(port), "--latency", str(latency),
               "--capacity", str(capacity), *[f"--fault={fault}" for fault in faults]]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "serving …" once it listens
    if not line.startswith("serving"):
        server.kill()
        raise SystemExit(f"the endpoint did not start: {' '.join(command)}")
    return server, f"http://127.0.0.1:{port}/v1"


def run_once(args: argparse.Namespace, base_url: str, executor: str, folder: Path) -> dict:
    command = [
        sys.executable, "-m", "distillprompt", "optimize", "--quiet",
        "--dataset", str(args.dataset), "--base-url", base_url, "--model", "test-model",
        "--epochs", str(args.epochs), "--train-size", str(args.train_size), "--test-size", str(args.test_size),
        "--concurrency", str(args.concurrency), "--executor", executor, "--no-cache", "--seed", str(args.seed),
        "--output", str(folder / executor),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{executor} run failed: {process.stderr.read()[-2000:]}")
    result = json.loads((folder / executor / "result.json").read_text())
    by_stage = result["usage"]["by_stage"]
    scoring = sum(by_stage.get(stage, {}).get("requests", 0) for stage in ("scoring", "test"))
    total = result["usage"]["total"]["requests"]
    chain = STAGES_PER_ROUND * len(result["rounds"])
    ideal = args.latency * (chain + scoring / args.capacity)
    return {
        "executor": executor,
        "wall_s": wall,
        "requests": total,
        "scoring_requests": scoring,
        "ideal_s": ideal,
        "ratio": wall / ideal,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "final_prompt": result["final_prompt"],
        "final_test": result["final_scores"]["test"]["score"],
        "by_actors": result.get("ray", {}).get("requests", {}).get("actors"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--capacity", type=int, default=32, help="requests the endpoint serves at once (C)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--fault", action="append", default=[], help="endpoint fault rate, e.g. 429=0.1")
    args = parser.parse_args()

    server, base_url = start_endpoint(args.latency, args.capacity, args.fault)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for attempt in range(args.repeat):
                for executor in args.executors.split(","):
                    rows.append(run_once(args, base_url, executor, Path(folder) / str(attempt)))
    finally:
        server.terminate()
        server.wait()

    print(
        f"latency {args.latency}s, C={args.capacity}, --concurrency {args.concurrency}, {args.epochs} epochs, "
        f"train {args.train_size}, test {args.test_size}, {os.cpu_count()} cores"
    )
    print("| executor | wall s | requests | of which via Ray actors | ideal s | wall / ideal | driver peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        via_actors = "-" if row["by_actors"] is None else str(row["by_actors"])
        print(
            f"| {row['executor']} | {row['wall_s']:.1f} | {row['requests']} | {via_actors} | {row['ideal_s']:.1f} | "
            f"{row['ratio']:.2f} | {row['peak_rss_mb']:.0f} |"
        )
    prompts = {row["final_prompt"] for row in rows}
    print(f"same final prompt in every run: {len(prompts) == 1}")


if __name__ == "__main__":
    main()
