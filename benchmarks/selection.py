"""Selection quality against cost: full and race scoring over seeds and train sizes, on a
scripted target whose every instruction has a known ("hidden") accuracy.

    python benchmarks/selection.py                               # the issue's setting: accuracies
                                                                 # 0.78-0.90, initial 0.843,
                                                                 # 3 rounds, 8 seeds, SST-2
    python benchmarks/selection.py --train-sizes 20,100 --variants "full=--scoring full" \\
        "race=--scoring race" "race-a0.1=--scoring race --race-alpha 0.1"
    python benchmarks/selection.py --correlation 0.5             # inputs hard for every instruction alike

The target (``tests.endpoint.HiddenAccuracy``) gives each distinct instruction an accuracy
drawn from ``--accuracy`` by a hash (the initial prompt's is pinned with
``--initial-accuracy``) and answers each input right with that probability, so the true
quality of any final prompt is known without a test sample. ``--correlation`` sets how much
the inputs' difficulty is shared between instructions (0: independent mistakes).

Every run is a real `distillprompt optimize` loop (in this process, executor ``local``)
against that endpoint on loopback. Reported per variant and train size: the final prompt's
true accuracy (mean and worst seed), how many seeds ended below the initial prompt's, and
the scoring requests of the search (train and validation, as calls: what a run with an
empty cache pays). All runs share one response cache (what two runs ask alike is answered
once, and still counted as a call by each).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillprompt import runner, templates  # noqa: E402
from distillprompt.cli import build_parser, settings_from_args  # noqa: E402
from distillprompt.engine import TRAIN_SCORING, VAL_SCORING  # noqa: E402
from distillprompt.settings import load_settings  # noqa: E402
from tests.endpoint import HiddenAccuracy, ScriptedEndpoint  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
SCORING_STAGES = (TRAIN_SCORING, VAL_SCORING)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    return name.strip(), shlex.split(flags)


def run_once(base_url: str, args: argparse.Namespace, flags: list[str], train_size: int, seed: int, folder: Path) -> dict:
    command = [
        "optimize", "--dataset", str(args.dataset), "--base-url", base_url, "--model", "test-model",
        "--rounds", str(args.rounds), "--train-size", str(train_size), "--test-size", "1", "--seed", str(seed),
        "--executor", "local", "--cache-path", str(folder / "cache.sqlite"), "--no-register",
        "--output", str(folder / "runs" / f"{train_size}-{seed}-{abs(hash(tuple(flags)))}"), *flags,
    ]
    settings = settings_from_args(build_parser().parse_args(command))
    result, _ = asyncio.run(runner.optimize(settings))
    scoring = sum(usage.calls for stage, usage in result.usage_by_stage.items() if stage in SCORING_STAGES)
    return {"final": result.final_prompt, "scoring": scoring, "stopped": result.race.get("stopped", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--accuracy", default="0.78:0.90", help="LOW:HIGH, the range instructions' accuracies are drawn from")
    parser.add_argument("--initial-accuracy", type=float, default=0.843)
    parser.add_argument("--correlation", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--train-sizes", default="100")
    parser.add_argument(
        "--variants", nargs="+", default=["full=--scoring full", "race=--scoring race"],
        help="NAME=FLAGS: the extra flags of each variant",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    low, high = (float(part) for part in args.accuracy.split(":"))
    variants = [parse_variant(text) for text in args.variants]
    sizes = [int(size) for size in args.train_sizes.split(",")]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        # the initial prompt the runs use: the task's default one, whose accuracy is pinned
        probe = load_settings({"data": {"dataset": str(args.dataset), "train_size": 1, "test_size": 1}})
        from distillprompt.data import load_task

        initial = templates.default_initial_prompt(load_task(probe.data, 0))
        target = HiddenAccuracy.from_arguments(args.accuracy, args.correlation, str(args.dataset),
                                               [f"{args.initial_accuracy}={initial}"], fresh=True)
        with ScriptedEndpoint(responder=target) as endpoint:
            for size in sizes:
                for name, flags in variants:
                    runs = [run_once(endpoint.base_url, args, flags, size, seed, folder) for seed in range(args.seeds)]
                    truths = [target.accuracy(run["final"]) for run in runs]
                    rows.append({
                        "variant": name, "train": size, "mean": statistics.fmean(truths), "worst": min(truths),
                        "worse": sum(truth < args.initial_accuracy - 1e-12 for truth in truths),
                        "scoring": statistics.fmean(run["scoring"] for run in runs),
                        "stopped": statistics.fmean(run["stopped"] for run in runs),
                    })
                    print(f"{name} train {size}: done", file=sys.stderr, flush=True)

    print(
        f"hidden accuracies {low:g}-{high:g}, initial {args.initial_accuracy:g}, correlation {args.correlation:g}, "
        f"{args.rounds} rounds, {args.seeds} seeds, {args.dataset.name}; {time.perf_counter() - started:.0f} s"
    )
    print("| variant | train | final accuracy, mean | worst seed | seeds below the initial | scoring requests | "
          "candidates stopped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['train']} | {row['mean']:.3f} | {row['worst']:.3f} | {row['worse']} of "
              f"{args.seeds} | {row['scoring']:.0f} | {row['stopped']:.1f} |")


if __name__ == "__main__":
    main()
