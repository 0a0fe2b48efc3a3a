"""How right the dry run's estimate is, and what --max-cost does with half of it.

    python benchmarks/estimate.py                       # ../shared/data/sst2, 3 rounds, train 50, test 100
    python benchmarks/estimate.py --capable             # the optimizer writes long structured prompts

Against the scripted endpoint (hidden accuracy 0.78-0.90, a new instruction every meta
reply; with --capable, replies in a capable model's style), each run with an empty cache of
its own: the dry run, then the same command under full scoring and under racing, then
full scoring with --max-cost at half the estimated cost, tracked by a real `mlflow server`
(sqlite) so that its registration is seen. Prices: $0.15 / $0.60 per 1M tokens in / out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, free_port, start_endpoint  # this folder is on sys.path when run as a script

sys.path.insert(0, str(ROOT))
from tests.conftest import start_mlflow_server, stop_group, venv_env  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "sst2"


def optimize(base_url: str, work: Path, data: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    command = [
        sys.executable, "-m", "distillprompt", "optimize", "--dataset", str(data), "--base-url", base_url,
        "--model", "test-model", "--epochs", "3", "--train-size", "50", "--test-size", "100", "--executor", "local",
        "--cache-path", str(work / f"{name}.sqlite"), "--output", str(work / name), "--price-input", "0.15",
        "--price-output", "0.6", "--quiet", *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=venv_env({"PYTHONPATH": str(ROOT)}))
    result = work / name / "result.json"
    return done, json.loads(result.read_text()) if result.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capable", action="store_true", help="a capable model's long prompts instead")
    parser.add_argument("--data", type=Path, default=DATA, help=f"dataset folder (default {DATA})")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="estimate-"))
    responder = ["--capable"] if args.capable else ["--hidden-accuracy", "0.78:0.90", "--fresh-prompts", "--gold", str(args.data)]
    endpoint, base_url = start_endpoint(0.0, 0, [], *responder)
    try:
        dry, _ = optimize(base_url, work, args.data, "dry", "--scoring", "full", "--dry-run")
        print(dry.stdout)
        full_done, full = optimize(base_url, work, args.data, "full", "--scoring", "full")
        race_done, race = optimize(base_url, work, args.data, "race", "--scoring", "race")
        assert full and race, (full_done.stderr[-2000:], race_done.stderr[-2000:])
        estimate = full["estimate"]
        store = work / "mlflow"
        store.mkdir()
        port = free_port()
        server = start_mlflow_server(store, port)
        try:
            budget = estimate["estimated_cost_usd"] / 2
            capped_done, capped = optimize(base_url, work, args.data, "capped", "--scoring", "full", "--max-cost", f"{budget:.6f}",
                                           "--tracking-uri", f"http://127.0.0.1:{port}", "--prompt-name", "capped")
        finally:
            stop_group(server)
    finally:
        endpoint.terminate()

    def tokens(usage: dict) -> int:
        return usage["input_tokens"] + usage["output_tokens"]

    usage = full["usage"]["total"]
    print("| run | requests | tokens | cost USD | estimate: requests | tokens | cost USD |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    est_tokens = estimate["estimated_input_tokens"] + estimate["estimated_output_tokens"]
    print(f"| full scoring | {usage['requests']:,} | {tokens(usage):,} | {usage['cost']:.4f} | "
          f"{estimate['estimated_requests']:,} ({usage['requests'] / estimate['estimated_requests'] - 1:+.1%}) | "
          f"{est_tokens:,} ({tokens(usage) / est_tokens - 1:+.1%}) | {estimate['estimated_cost_usd']:.4f} "
          f"({usage['cost'] / estimate['estimated_cost_usd'] - 1:+.1%}) |")
    bound = race["estimate"]
    ru = race["usage"]["total"]
    print(f"| race | {ru['requests']:,} | {tokens(ru):,} | {ru['cost']:.4f} | expected {bound['estimated_requests']:,}, "
          f"at most {bound['estimated_requests_max']:,} | at most "
          f"{bound['estimated_input_tokens_max'] + bound['estimated_output_tokens_max']:,} | "
          f"at most {bound['estimated_cost_usd_max']:.4f} |")
    if capped:
        cu = capped["usage"]["total"]
        registered = [line for line in capped_done.stderr.splitlines() if line.startswith("registered prompt")]
        print(f"\n--max-cost {budget:.6f} (half the estimate): stop reason {capped['stop_reason']}, spent "
              f"${cu['cost']:.6f} ({cu['cost'] / budget:.0%} of the budget), {cu['requests']:,} requests, "
              f"{len(capped['rounds'])} round(s) kept, exit {capped_done.returncode}; "
              f"{registered[0] if registered else 'nothing registered: ' + capped_done.stderr[-500:]}")


if __name__ == "__main__":
    main()
