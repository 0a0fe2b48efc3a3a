"""Whole-process wall time of `distillprompt optimize` against a slow endpoint, next to the
ideal time, for the in-process and the Ray executor side by side (and, optionally, the
authors' DistillPrompt implementation run from a separate environment).

The endpoint (tests/endpoint.py, a fresh process per run) holds each request a fixed
latency and serves at most C requests at once. The ideal time of a run is

    latency × (meta-requests that must run one after another + scoring requests / C)

where each round has 5 meta-requests in a chain (rewrite, distill, compress, aggregate,
paraphrase; the requests within a stage run side by side). Everything the process does is
counted: interpreter start, imports, data loading, Ray start-up and shutdown. The endpoint
reports when it was busy (at least one request in service), so the table shows where the
rest of the wall time went: before the first request, after the last reply, and idle gaps
in between.

    python benchmarks/scoring_throughput.py --repeat 2     # the defaults of the throughput issue
    python benchmarks/scoring_throughput.py --executors local,ray,ray-cluster   # and through Ray actors
    python benchmarks/scoring_throughput.py --reference "/path/to/venv/bin/python benchmarks/reference_distillprompt.py"
    python benchmarks/scoring_throughput.py --scorings full,race --train-size 100 --rounds 3   # racing's wall time

With ``--scorings`` each executor runs once per scoring mode, side by side; a race's blocks
of one candidate run one after another, so its ideal time understates what it can reach.
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path

from common import add_run_arguments, executor_setup, read_result, run_against_endpoint, run_command

STAGES_PER_ROUND = 5


def measure(args: argparse.Namespace, name: str, folder: Path, scoring: str) -> dict:
    if name == "reference":
        return measure_in(args, name, folder, name, None, scoring)
    with executor_setup(name, folder) as (executor, env, _):
        row = measure_in(args, name, folder, executor, env, scoring)
    if len(args.scorings.split(",")) > 1:
        row["name"] = f"{name}, {scoring}"
    return row


def measure_in(
    args: argparse.Namespace, name: str, folder: Path, executor: str, env: dict[str, str] | None, scoring: str
) -> dict:
    if name == "reference":
        def command(base_url: str) -> list[str]:
            return shlex.split(args.reference) + [
                "--base-url", base_url, "--model", "test-model", "--dataset", str(args.dataset),
                "--rounds", str(args.rounds), "--train-size", str(args.train_size), "--test-size", str(args.test_size),
                "--concurrency", str(args.concurrency),
            ]

        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    else:
        def command(base_url: str) -> list[str]:
            return run_command(args, base_url, executor, folder / "out", args.concurrency, scoring)

    finished, stats = run_against_endpoint((args.latency, args.capacity, [], []), command, folder, env)
    row = {
        "name": name,
        "scoring": scoring,
        "wall_s": finished.wall_s,
        "requests": stats["requests"],
        "busy_s": stats["busy_s"],
        "before_first_s": (stats["first_start"] or finished.ended) - finished.started,
        "after_last_s": finished.ended - (stats["last_end"] or finished.started),
        "gaps_s": stats["idle_gaps_s"],
        "driver_cpu_ms": 1000 * finished.driver_cpu_s / max(stats["requests"], 1),
        "maxrss_mb": finished.maxrss_mb,
        "longest_gaps": stats["longest_gaps"],
    }
    if name != "reference":
        result = read_result(folder / "out")
        by_stage = result["usage"]["by_stage"]
        scored = sum(usage["requests"] for stage, usage in by_stage.items() if stage in ("train", "validation", "test"))
        chain = STAGES_PER_ROUND * len(result["rounds"])
        row.update(
            ideal_s=args.latency * (chain + scored / args.capacity),
            final_prompt=result["final_prompt"],
            by_actors=result.get("ray", {}).get("requests", {}).get("actors"),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--capacity", type=int, default=32, help="requests the endpoint serves at once (C)")
    parser.add_argument("--concurrency", default="32")
    parser.add_argument(
        "--reference", help="command that runs the authors' implementation (it gets --base-url, --model, --dataset, "
        "--rounds, --train-size, --test-size, --concurrency)",
    )
    parser.add_argument(
        "--scorings", default=None, help="--scoring of each run, side by side, e.g. full,race (default: --scoring)"
    )
    args = parser.parse_args()
    args.scorings = args.scorings or args.scoring

    names = args.executors.split(",") + (["reference"] if args.reference else [])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(args.repeat):
            for name in names:
                for scoring in args.scorings.split(",") if name != "reference" else ["full"]:
                    rows.append(measure(args, name, Path(folder) / f"{attempt}-{name}-{scoring}", scoring))

    print(
        f"latency {args.latency}s, C={args.capacity}, --concurrency {args.concurrency}, {args.rounds} rounds, "
        f"train {args.train_size}, test {args.test_size}, --scoring {args.scorings}, no cache, {os.cpu_count()} cores"
    )
    print("| run | wall s | requests | endpoint busy s | before first request s | after last reply s | idle gaps s "
          "| ideal s | wall / ideal | driver CPU ms / request | driver peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ideal = row.get("ideal_s")
        ratio = f"{row['wall_s'] / ideal:.2f}" if ideal else "-"
        print(
            f"| {row['name']} | {row['wall_s']:.1f} | {row['requests']} | {row['busy_s']:.1f} | {row['before_first_s']:.1f} | "
            f"{row['after_last_s']:.1f} | {row['gaps_s']:.1f} | {'-' if ideal is None else round(ideal, 1)} | "
            f"{ratio} | {row['driver_cpu_ms']:.2f} | {row['maxrss_mb']:.0f} |"
        )
    print("\nlongest idle gaps of the endpoint (seconds, at second, after stage -> before stage):")
    for row in rows:
        shown = ", ".join(f"{gap:.2f} at {at:.1f} {before}->{after}" for gap, at, before, after in row["longest_gaps"][:5])
        print(f"  {row['name']}: {shown}")
    for scoring in args.scorings.split(","):
        ours = [row for row in rows if row["name"] != "reference" and row["scoring"] == scoring]
        print(f"same final prompt in every {scoring}-scoring run: {len({row['final_prompt'] for row in ours}) == 1}")
    reference = [row["wall_s"] for row in rows if row["name"] == "reference"]
    if reference:
        best = sum(reference) / len(reference)
        for name in args.executors.split(","):
            walls = [row["wall_s"] for row in rows if row["name"] == name]
            print(f"reference / {name}: {best / (sum(walls) / len(walls)):.1f}× (mean wall times)")


if __name__ == "__main__":
    main()
