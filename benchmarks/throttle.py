"""--concurrency auto against an endpoint that answers 429 above an undisclosed number of
requests in flight, next to a run told that number, side by side in one run.

The endpoint (tests/endpoint.py, a fresh process per run) holds each request a fixed latency
and answers 429 at once to a request that arrives while --throttle requests are being
served (no Retry-After unless --retry-after). Each run is a whole `distillprompt optimize`
process (--no-cache). Reported: wall time, requests answered, 429s and their share of all
requests, the ratio of each auto run's wall time to the fixed run's, and whether the final
prompts agree.

    python benchmarks/throttle.py                  # throttle 24, latency 0.2 s, local and ray
    python benchmarks/throttle.py --repeat 2 --executors local
    python benchmarks/throttle.py --executors ray-cluster   # every scoring request through Ray actors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import add_run_arguments, executor_setup, read_result, run_against_endpoint, run_command


def measure(args: argparse.Namespace, executor: str, concurrency: str, folder: Path) -> dict:
    extra = ["--throttle", str(args.throttle)] + (["--throttle-retry-after", args.retry_after] if args.retry_after else [])

    with executor_setup(executor, folder) as (flag, env, _):
        def command(base_url: str) -> list[str]:
            return run_command(args, base_url, flag, folder / "out", concurrency)

        finished, stats = run_against_endpoint((args.latency, 0, [], extra), command, folder, env=env)
    result = read_result(folder / "out")
    refused = sum(count for key, count in stats["counts"].items() if key.endswith(":429"))
    limits = [r["concurrency"].get("limit") for r in result["rounds"] if r.get("concurrency")]
    return {
        "executor": executor,
        "concurrency": concurrency,
        "wall_s": finished.wall_s,
        "requests": stats["requests"],
        "refused": refused,
        "counted": result["usage"]["total"].get("throttled"),
        "peak": stats["peak_in_flight"],
        "limits": limits,
        "final_prompt": result["final_prompt"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--throttle", type=int, default=24, help="429 above this many requests in flight")
    parser.add_argument("--retry-after", default="", help="Retry-After of the 429s (none by default)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(args.repeat):
            for executor in args.executors.split(","):
                for concurrency in (str(args.throttle), "auto"):
                    rows.append(measure(args, executor, concurrency, Path(folder) / f"{attempt}-{executor}-{concurrency}"))

    print(
        f"endpoint: latency {args.latency}s, 429 above {args.throttle} in flight"
        f"{', Retry-After ' + args.retry_after if args.retry_after else ''}; {args.rounds} rounds, "
        f"train {args.train_size}, test {args.test_size}, no cache"
    )
    print("| executor | --concurrency | wall s | requests (429s included) | 429s | 429 share | counted by the run "
          "| endpoint peak in flight | bound at each round's end | wall / fixed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for index, row in enumerate(rows):
        fixed = rows[index - 1] if row["concurrency"] == "auto" else row
        print(
            f"| {row['executor']} | {row['concurrency']} | {row['wall_s']:.1f} | {row['requests']} | {row['refused']} | "
            f"{100 * row['refused'] / max(row['requests'], 1):.1f}% | {row['counted']} | {row['peak']} | "
            f"{', '.join(f'{limit:.0f}' for limit in row['limits'])} | {row['wall_s'] / fixed['wall_s']:.2f} |"
        )
    print(f"same final prompt in every run: {len({row['final_prompt'] for row in rows}) == 1}")


if __name__ == "__main__":
    main()
