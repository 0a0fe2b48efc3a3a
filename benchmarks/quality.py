"""Result quality over seeds: `distillprompt compare` per variant, one table.

    python benchmarks/quality.py                                  # demo task, embedded model,
                                                                  # distillprompt,initial, 3 seeds,
                                                                  # validation off and on (20)
    python benchmarks/quality.py --dataset ../shared/data/sst2 --train-size 50 --test-size 200 \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-0.5B-Instruct \\
        --optimizer-base-url http://localhost:8001/v1 --optimizer-model Qwen/Qwen2.5-7B-Instruct

Each variant (``--variants``: a name and the extra flags it gives, ``val0=--val-size 0``) is
one `distillprompt compare` child process with its own MLflow parent run (a sqlite store in
the output folder unless MLFLOW_TRACKING_URI is set); all variants share one response cache,
so what they ask alike is paid once. The report: per variant and method, the test score
mean ± std over seeds; the paired bootstrap interval of each method minus ``initial`` on the
pooled test examples of all seeds; and, for every variant after the first, DistillPrompt of
that variant minus DistillPrompt of the first. Written to REPORT.md in the output folder and
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillprompt.verdict import paired_bootstrap  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    return name.strip(), shlex.split(flags)


def run_variant(name: str, flags: list[str], args: argparse.Namespace, folder: Path, common: list[str]) -> float:
    out = folder / name
    command = [
        sys.executable, "-m", "distillprompt", "compare", "--methods", args.methods, "--seeds", str(args.seeds),
        "--output", str(out), "--quiet", *common, *flags,
    ]
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    print(f"== {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed with exit code {done.returncode}")
    return time.perf_counter() - started


def outcomes(folder: Path, methods: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            result = json.loads((folder / f"{method}-seed{seed}" / "result.json").read_text())
            found.setdefault(method, []).append(result)
    return found


def per_example(result: dict) -> list[float]:
    return [row["score"] for row in result["test_outputs"]["final"]]


def report(variants: list[str], results: dict[str, dict[str, list[dict]]], walls: dict[str, float], args) -> str:
    metric = next(iter(next(iter(results.values())).values()))[0]["task"]["metric"]
    lines = [
        f"| variant | method | test {metric} mean ± std | per seed | − initial, paired 95% CI (per-example) | "
        "requests sent | calls |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for variant in variants:
        by_method = results[variant]
        initial = by_method.get("initial")
        for method, runs in by_method.items():
            scores = [r["final_scores"]["test"]["score"] for r in runs]
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            difference = "—"
            if initial is not None and method != "initial":
                before = [x for r in initial for x in per_example(r)]
                after = [x for r in runs for x in per_example(r)]
                mean, low, high = paired_bootstrap(before, after, args.seed)
                difference = f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"
            sent = sum(r["usage"]["total"]["requests"] for r in runs)
            calls = sum(r["usage"]["total"]["calls"] for r in runs)
            lines.append(
                f"| {variant} | {method} | {statistics.fmean(scores):.4f} ± {spread:.4f} | "
                f"{', '.join(f'{s:.4f}' for s in scores)} | {difference} | {sent} | {calls} |"
            )
    reference = variants[0]
    if "distillprompt" in results[reference]:
        lines += ["", f"| DistillPrompt: variant − {reference} | paired 95% CI (per-example, pooled seeds) |", "|---|---:|"]
        base = [x for r in results[reference]["distillprompt"] for x in per_example(r)]
        for variant in variants[1:]:
            other = [x for r in results[variant]["distillprompt"] for x in per_example(r)]
            mean, low, high = paired_bootstrap(base, other, args.seed)
            lines.append(f"| {variant} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
    lines += ["", "| variant | wall time s |", "|---|---:|"] + [f"| {v} | {walls[v]:.0f} |" for v in variants]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--methods", default="distillprompt,initial")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--rounds", "--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=50)
    parser.add_argument("--base-url", help="target endpoint (default: the embedded model)")
    parser.add_argument("--model")
    parser.add_argument("--optimizer-base-url")
    parser.add_argument("--optimizer-model")
    parser.add_argument("--variant", action="append", dest="variants",
                        help="NAME=FLAGS, repeatable (default: val0='--val-size 0' and val20='--val-size 20')")
    parser.add_argument("--cache-path", help="response cache shared by the variants (default: a fresh one)")
    parser.add_argument("--output", type=Path, help="folder for the runs and REPORT.md (default: a temp folder)")
    parser.add_argument("--executor", default="local")
    args = parser.parse_args()

    folder = (args.output or Path(tempfile.mkdtemp(prefix="quality-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    common = [
        "--dataset", args.dataset, "--rounds", str(args.rounds), "--train-size", str(args.train_size),
        "--test-size", str(args.test_size), "--seed", str(args.seed), "--executor", args.executor,
        "--cache-path", args.cache_path or str(folder / "cache.sqlite"),
    ]
    for flag in ("base_url", "model", "optimizer_base_url", "optimizer_model"):
        if getattr(args, flag):
            common += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    variants = [parse_variant(v) for v in (args.variants or ["val0=--val-size 0", "val20=--val-size 20"])]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [args.seed + offset for offset in range(args.seeds)]
    walls, results = {}, {}
    for name, flags in variants:
        walls[name] = run_variant(name, flags, args, folder, common)
        results[name] = outcomes(folder / name, methods, seeds)
    text = report([name for name, _ in variants], results, walls, args)
    header = (
        f"dataset {args.dataset}, methods {args.methods}, seeds {seeds}, rounds {args.rounds}, train "
        f"{args.train_size}, test {args.test_size}, target {args.model or 'embedded'} at {args.base_url or 'local'}, "
        f"optimizer {args.optimizer_model or args.model or 'embedded'}\n\n"
    )
    (folder / "REPORT.md").write_text(header + text + "\n")
    print(header + text)
    print(f"\nruns and REPORT.md in {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
