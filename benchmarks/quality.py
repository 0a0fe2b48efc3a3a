"""Result quality over seeds: `distillprompt compare` per variant, one table.

    python benchmarks/quality.py                                  # demo task, embedded model,
                                                                  # distillprompt,initial, 3 seeds
    # the real-model benchmark (benchmarks/README.md): Qwen2.5-Coder-1.5B on llama.cpp
    python benchmarks/quality.py --dataset ../shared/data/sst5 --train-size 60 --test-size 200 --rounds 2 \\
        --base-url http://127.0.0.1:18015/v1 --model qwen15 \\
        --variant "defaults=--methods distillprompt,initial,fewshot,grips --budget-match" \\
        --variant "paper=--methods distillprompt --paper"

Each variant (``--variant NAME=FLAGS``: flags added to the common ones, a ``--methods`` among
them wins) is one `distillprompt compare` child process with its own MLflow parent run (a
sqlite store in the output folder unless MLFLOW_TRACKING_URI is set); all variants share one
response cache, so what they ask alike (the initial prompt's scoring, above all) is paid
once. The report, per variant and method: the test metric's mean ± std over seeds and per
seed; the difference from ``initial`` with its paired 95% bootstrap interval over the test
examples of every seed pooled (the examples resampled, the metric - macro-F1 for
classification - counted again on each resample; accuracy's interval beside it); requests
sent to the endpoint, calls (the cache's too) and wall time. Then DistillPrompt of each
variant minus DistillPrompt of the first, and minus each baseline, the same way. Written to
REPORT.md and report.json in the output folder and printed. ``--report-only`` rebuilds the
report from the runs already in the output folder.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillprompt.paired import label_codes, paired_interval  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    return name.strip(), shlex.split(flags)


def methods_of(flags: list[str], default: str) -> list[str]:
    """The methods a variant runs: its own ``--methods``, else the benchmark's."""
    chosen = default
    for i, flag in enumerate(flags):
        if flag == "--methods" and i + 1 < len(flags):
            chosen = flags[i + 1]
        elif flag.startswith("--methods="):
            chosen = flag.split("=", 1)[1]
    return [m.strip() for m in chosen.split(",") if m.strip()]


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


def test_sample(run: dict) -> tuple:
    """What a run's test sample is drawn by: a test split's sample depends on the seed and its
    size alone, so runs whose validation samples differ (``--val-size``) answered the same
    examples; one held out of train depends on the train sample too."""
    task = run["task"]
    held_out = task["test_split"].endswith("(held out)")
    return (task["source"], task["test_split"], task["test_size"], run["settings"]["seed"],
            task["train_size"] if held_out else None)


class Pooled:
    """The final prompts' test answers of several runs (one per seed), pooled."""

    def __init__(self, runs: list[dict]) -> None:
        task = runs[0]["task"]
        self.labels = task["labels"] if task["task"] == "classification" else None
        rows = [row for run in runs for row in run["test_outputs"]["final"]]
        if self.labels is None:
            self.record = [float(row["score"]) for row in rows]
            self.targets = None
        else:
            self.record = [float(c) for c in label_codes(self.labels, [row["prediction"] for row in rows])]
            self.targets = [float(c) for c in label_codes(self.labels, [row["target"] for row in rows])]
        self.correct = [float(row["score"]) for row in rows]
        self.keys = [(*test_sample(run), i, row["target"])
                     for run in runs for i, row in enumerate(run["test_outputs"]["final"])]

    def minus(self, other: Pooled, seed: int) -> dict[str, float]:
        """self − other on the metric (and accuracy), paired over the same pooled examples."""
        if self.keys != other.keys:
            raise SystemExit("the runs compared did not answer the same test examples: same seeds and sizes needed")
        count = len(self.labels) if self.labels is not None else None
        mean, low, high = paired_interval(other.record, self.record, self.targets, count, seed)
        figures = {"difference": mean, "low": low, "high": high}
        if self.labels is not None:
            mean, low, high = paired_interval(other.correct, self.correct, seed=seed)
            figures.update(accuracy_difference=mean, accuracy_low=low, accuracy_high=high)
        return figures


def interval_text(figures: dict[str, float] | None) -> str:
    if not figures:
        return "—"
    text = f"{figures['difference']:+.4f} [{figures['low']:+.4f}, {figures['high']:+.4f}]"
    if "accuracy_difference" in figures:
        text += (f" (acc {figures['accuracy_difference']:+.4f} [{figures['accuracy_low']:+.4f}, "
                 f"{figures['accuracy_high']:+.4f}])")
    return text


def summarize(variants: list[str], results: dict[str, dict[str, list[dict]]], seed: int) -> dict[str, Any]:
    initial_runs = next((by["initial"] for by in results.values() if "initial" in by), None)
    initial = Pooled(initial_runs) if initial_runs else None
    rows = []
    for variant in variants:
        for method, runs in results[variant].items():
            pooled = Pooled(runs)
            scores = [r["final_scores"]["test"]["score"] for r in runs]
            rows.append({
                "variant": variant, "method": method, "scores": scores,
                "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "minus_initial": pooled.minus(initial, seed) if initial is not None and method != "initial" else None,
                "sent": sum(r["usage"]["total"]["requests"] for r in runs),
                "calls": sum(r["usage"]["total"]["calls"] for r in runs),
                "wall": sum(r["wall_time_seconds"] for r in runs),
                "final_prompts": [r["final_prompt"] for r in runs],
                "kept_initial": sum(r["final_candidate"] == 0 for r in runs),
            })
    reference = variants[0]
    contrasts = []
    if "distillprompt" in results[reference]:
        ours = Pooled(results[reference]["distillprompt"])
        for variant in variants[1:]:
            if "distillprompt" in results[variant]:
                contrasts.append({"what": f"distillprompt {reference} − distillprompt {variant}",
                                  **ours.minus(Pooled(results[variant]["distillprompt"]), seed)})
        for method, runs in results[reference].items():
            if method not in ("distillprompt", "initial"):
                contrasts.append({"what": f"distillprompt {reference} − {method}", **ours.minus(Pooled(runs), seed)})
    return {"rows": rows, "contrasts": contrasts}


def report(summary: dict[str, Any], metric: str) -> str:
    lines = [
        f"| variant | method | test {metric} mean ± std | per seed | − initial, {metric} [paired 95% CI, pooled seeds] "
        "(accuracy) | kept initial | requests sent | calls | wall s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['variant']} | {row['method']} | {row['mean']:.4f} ± {row['std']:.4f} | "
            f"{', '.join(f'{s:.4f}' for s in row['scores'])} | {interval_text(row['minus_initial'])} | "
            f"{row['kept_initial']} | {row['sent']} | {row['calls']} | {row['wall']:.0f} |"
        )
    if summary["contrasts"]:
        lines += ["", f"| contrast | {metric} [paired 95% CI, pooled seeds] (accuracy) |", "|---|---:|"]
        lines += [f"| {c['what']} | {interval_text(c)} |" for c in summary["contrasts"]]
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
                        help="NAME=FLAGS, repeatable (default: one variant, defaults=)")
    parser.add_argument("--cache-path", help="response cache shared by the variants (default: a fresh one)")
    parser.add_argument("--output", type=Path, help="folder for the runs and REPORT.md (default: a temp folder)")
    parser.add_argument("--executor", default="local")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from --output's runs")
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
    if args.base_url:
        common += ["--api-key", os.environ.get("OPENAI_API_KEY", "none")]
    variants = [parse_variant(v) for v in (args.variants or ["defaults="])]
    seeds = [args.seed + offset for offset in range(args.seeds)]
    results = {}
    for name, flags in variants:
        if not args.report_only:
            run_variant(name, flags, args, folder, common)
        results[name] = outcomes(folder / name, methods_of(flags, args.methods), seeds)
    summary = summarize([name for name, _ in variants], results, args.seed)
    metric = next(iter(next(iter(results.values())).values()))[0]["task"]["metric"]
    text = report(summary, metric)
    header = (
        f"dataset {args.dataset}, seeds {seeds}, rounds {args.rounds}, train {args.train_size}, test "
        f"{args.test_size}, target {args.model or 'embedded'} at {args.base_url or 'local'}, optimizer "
        f"{args.optimizer_model or args.model or 'embedded'}; variants: "
        + "; ".join(f"{name} = {' '.join(flags) or '(defaults)'}" for name, flags in variants) + "\n\n"
    )
    (folder / "REPORT.md").write_text(header + text + "\n")
    (folder / "report.json").write_text(json.dumps(summary, indent=1))
    print(header + text)
    print(f"\nruns and REPORT.md in {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
