"""``distillprompt compare``: every method with every seed, under one parent MLflow run.

Each (method, seed) is a child run recorded like any single run (same metrics, tables and
artifacts, tagged with its method). The parent holds the comparison: test score (mean and
standard deviation over seeds), scoring and meta requests, tokens, and the paired bootstrap interval of
DistillPrompt minus each baseline on the same test examples. Calls and tokens count what
each run asked for, whether the endpoint or the response cache answered, so a rerun with
the same seeds reproduces the table exactly and sends nothing; wall times, which no rerun
reproduces, are in a table of their own.

With ``--budget-match`` every searching method gets the scoring requests DistillPrompt
spent with the same seed: GrIPS runs as many iterations as that budget pays for (its
patience off, no candidate past the budget). Either way the table shows each method's
scoring requests, meta requests and tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillprompt import runner
from distillprompt.cli import INCOMPLETE
from distillprompt.cost import require_prices
from distillprompt.errors import UserError
from distillprompt.engine import TEST_SCORING, TRAIN_SCORING, VAL_SCORING
from distillprompt.progress import ConsoleProgress
from distillprompt.methods import METHODS, method_for
from distillprompt.settings import METHOD_NAMES, Settings
from distillprompt.paired import label_codes, paired_interval, record_of

from .tracking import MlflowTracker
from .tracking.params import log_settings

REFERENCE = "distillprompt"
DEFAULT_METHODS = tuple(METHODS)  # the built-in ones; MLflow's optimizers when named


@dataclass
class ComparedRun:
    """One (method, seed) child run's figures, for the comparison's tables."""

    method: str
    seed: int
    run_id: str
    test_score: float
    calls: int
    tokens: int
    sent: int
    wall_time: float
    per_example: list[float]
    metric: str = "score"
    diagnosis: str | None = None  # why the run could not improve (a round without signal)
    scoring_calls: int = 0  # the search's scoring requests (train and validation)
    meta_calls: int = 0  # the optimizer model's requests
    # the final prompt's test record (``paired.record_of``) and the targets as label codes
    # (classification), for intervals on the metric itself
    record: list[float] = field(default_factory=list)
    targets: list[float] | None = None
    label_count: int | None = None
    train_size: int = 0  # the run's train sample (--budget-match sizes a method's iterations by it)


def test_record(score: Any, labels: list[str] | None) -> dict[str, Any]:
    """A ``ComparedRun``'s test record, targets and label count, from its final test ``Score``."""
    if labels is None:
        return {"record": record_of(score, None)}
    return {"record": record_of(score, labels), "targets": [float(c) for c in label_codes(labels, score.targets)],
            "label_count": len(labels)}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise UserError(f"unknown method {', '.join(unknown) or '(none)'}: --methods takes a comma list of "
                        f"{', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(methods))


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def comparison_tables(outcomes: list[ComparedRun], methods: list[str], seed: int = 0) -> tuple[list[dict[str, Any]], str, str]:
    rows = []
    for method in methods:
        mine = [o for o in outcomes if o.method == method]
        scores = [o.test_score for o in mine]
        row: dict[str, Any] = {
            "method": method,
            "runs": len(mine),
            "test_score_mean": statistics.fmean(scores),
            "test_score_std": _std(scores),
            "llm_calls": round(statistics.fmean(o.calls for o in mine), 1),
            "scoring_calls": round(statistics.fmean(o.scoring_calls for o in mine), 1),
            "meta_calls": round(statistics.fmean(o.meta_calls for o in mine), 1),
            "tokens": round(statistics.fmean(o.tokens for o in mine), 1),
            "no_signal_runs": sum(1 for o in mine if o.diagnosis),
        }
        reference = [o for o in outcomes if o.method == REFERENCE]
        if method != REFERENCE and reference:
            before: list[float] = []
            after: list[float] = []
            targets: list[float] | None = [] if reference[0].targets is not None else None
            for ours in reference:
                theirs = next((o for o in mine if o.seed == ours.seed), None)
                if theirs is not None:
                    before += theirs.record
                    after += ours.record
                    if targets is not None:
                        targets += ours.targets or []
            # the metric counted again on resampled test examples of every seed pooled
            mean, low, high = paired_interval(before, after, targets, reference[0].label_count, seed)
            row.update(diff_vs_distillprompt=mean, diff_ci_low=low, diff_ci_high=high)
        rows.append(row)
    metric = outcomes[0].metric if outcomes else "score"
    lines = [
        f"| method | runs | test {metric} (mean ± std) | scoring requests | meta requests | tokens | "
        f"DistillPrompt − method, {metric} [paired 95% CI] | runs without signal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        difference = (
            f"{row['diff_vs_distillprompt']:+.4f} [{row['diff_ci_low']:+.4f}, {row['diff_ci_high']:+.4f}]"
            if "diff_vs_distillprompt" in row
            else "—"
        )
        lines.append(
            f"| {row['method']} | {row['runs']} | {row['test_score_mean']:.4f} ± {row['test_score_std']:.4f} | "
            f"{row['scoring_calls']:g} | {row['meta_calls']:g} | {row['tokens']:g} | {difference} | "
            f"{row['no_signal_runs'] or '—'} |"
        )
    timing = ["| method | wall time s (mean) | requests sent (sum) |", "|---|---:|---:|"]
    for method in methods:
        mine = [o for o in outcomes if o.method == method]
        timing.append(f"| {method} | {statistics.fmean(o.wall_time for o in mine):.1f} | {sum(o.sent for o in mine)} |")
    return rows, "\n".join(lines), "\n".join(timing)


SCORING_STAGES = (TRAIN_SCORING, VAL_SCORING)  # the search's scoring; the test scoring is the same for every method


def _split_usage(result: Any) -> tuple[int, int]:
    """Scoring requests of the search (train and validation) and meta requests (the rest
    but the test sample), counted as calls: served by the endpoint or the cache."""
    scoring = meta = 0
    for stage, usage in result.usage_by_stage.items():
        if stage in SCORING_STAGES:
            scoring += usage.calls
        elif stage != TEST_SCORING:
            meta += usage.calls
    return scoring, meta


def child_settings(settings: Settings, method: str, offset: int, budget: tuple[int, int] | None = None) -> Settings:
    """One child run's settings: the method, the seed ``offset`` after the comparison's, an
    output folder of its own, nothing registered; with ``budget`` (--budget-match: the
    reference's scoring requests and train size, this seed) as many scoring requests as the
    reference spent, as the method fits them (``Method.with_scoring_budget``)."""
    seed = settings.seed + offset
    optimizer = settings.optimizer.model_copy(update={"method": method})
    if budget is not None and method != REFERENCE:
        optimizer = method_for(method).with_scoring_budget(optimizer, *budget)
    changes: dict[str, Any] = {"seed": seed, "optimizer": optimizer,
                               "mlflow": settings.mlflow.model_copy(update={"register_result": False})}
    if settings.output is not None:
        changes["output"] = Path(settings.output) / f"{method}-seed{seed}"
    return settings.model_copy(update=changes)


def compare(
    settings: Settings, methods: list[str], seeds: int, *, quiet: bool = False, budget_match: bool = False
) -> tuple[str, str, str, list[str]]:

    if budget_match and REFERENCE not in methods:
        raise UserError(f"--budget-match gives every method {REFERENCE}'s scoring budget: add {REFERENCE} to --methods")
    order = [REFERENCE, *(m for m in methods if m != REFERENCE)] if budget_match else methods

    parent = MlflowTracker(settings)
    succeeded = False
    outcomes: list[ComparedRun] = []
    children: list[MlflowTracker] = []
    untracked: list[str] = []  # children that ran without a run of their own: the server was away
    try:
        params = {**settings.public_dict(), "methods": ",".join(methods), "seeds": seeds, "budget_match": budget_match}

        def record_start() -> None:
            import mlflow

            log_settings(parent.mlflow, parent.run_id, params)
            mlflow.set_tag("distillprompt.method", "compare")

        parent.record("comparison params", record_start)
        for offset in range(seeds):
            budget: tuple[int, int] | None = None  # the reference's scoring requests and train size, this seed
            for method in order:
                child = child_settings(settings, method, offset, budget)
                tracker = child_tracker(child, method, parent.run_id)
                if tracker is not None:
                    children.append(tracker)
                else:
                    untracked.append(f"{method}-seed{child.seed}")
                compared = run_child(child, method, tracker, quiet)
                if budget_match and method == REFERENCE:
                    budget = (compared.scoring_calls, compared.train_size)
                outcomes.append(compared)
        rows, table, timing = comparison_tables(outcomes, methods, settings.seed)
        # the parent's table goes through its outbox: a server that is away gets it when it is back
        ended = int(time.time() * 1000)
        parent.record("comparison table", functools.partial(record_table, rows, table, timing, outcomes, ended))
        succeeded = True
    finally:
        parent.on_end(succeeded)
    unfinished = [text for text in (tracker.incomplete() for tracker in children) if text]
    if untracked:
        unfinished.append(
            f"{', '.join(untracked)} ran while the MLflow server was away and have no child run; their scores are in "
            "the table above. Rerun the same compare command once the server answers: the response cache answers "
            "every request, and a new parent run holds every child"
        )
    if parent.lost is not None:
        unfinished.append(
            f"the comparison's parent run {parent.run_id} lost MLflow tracking ({parent.lost}); its table is printed "
            "above (and in comparison.md with --output). Rerun the same compare command once the server answers: "
            "the response cache answers every request, and a new parent run holds the whole table"
        )
    return table, timing, parent.run_id, unfinished


def child_tracker(child: Settings, method: str, parent_run_id: str) -> MlflowTracker | None:
    """A child run's tracker under the parent's run; None when the server does not answer now
    (the child runs locally all the same, its result.json with --output, and its row reaches
    the parent's table through the parent's queue)."""
    name = f"{method}-seed{child.seed}"
    try:
        return MlflowTracker(child, parent_run_id=parent_run_id, run_name=name)
    except UserError as error:
        print(f"distillprompt: warning: {name} runs without an MLflow run of its own: {error}", file=sys.stderr,
              flush=True)
        return None


def run_child(child: Settings, method: str, tracker: MlflowTracker | None, quiet: bool) -> ComparedRun:
    """One (method, seed) run, recorded like any single run; its figures for the table."""
    progress = None if quiet else ConsoleProgress()
    print(f"== {method}, seed {child.seed} ==", file=sys.stderr, flush=True)
    callbacks = [tracker] if tracker is not None else []
    result, _ = asyncio.run(runner.optimize(child, callbacks=callbacks, progress=progress))
    if result.failure or result.final_test is None:
        raise UserError(f"{method} with seed {child.seed} did not finish ({result.failure}): see its child run")
    usage = result.usage
    scoring, meta = _split_usage(result)
    labels = result.task.get("labels") if result.task.get("task") == "classification" else None
    return ComparedRun(
        method=method, seed=child.seed, run_id=tracker.run_id if tracker is not None else "",
        test_score=result.final_scores["test"]["score"], calls=usage.calls, scoring_calls=scoring, meta_calls=meta,
        tokens=usage.tokens + usage.cached_tokens, sent=usage.requests, wall_time=result.wall_time,
        per_example=result.final_test.per_example, metric=result.task.get("metric", "score"),
        **test_record(result.final_test, labels), diagnosis=result.diagnosis,
        train_size=int(result.task.get("train_size") or 1),
    )


def record_table(rows: list[dict[str, Any]], table: str, timing: str, outcomes: list[ComparedRun], stamp: int) -> None:
    """The parent run's table. Made again after a call whose answer was lost, it is the same
    record: the table is written once (``log_table`` adds to a table there) and the metrics
    carry the time the comparison ended."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    there = {entry.path for entry in mlflow.MlflowClient().list_artifacts(run_id, "comparison")}
    if "comparison/table.json" not in there:
        mlflow.log_table(data={k: [row.get(k) for row in rows] for k in dict.fromkeys(k for r in rows for k in r)},
                         artifact_file="comparison/table.json")
    mlflow.log_text(table + "\n\n" + timing + "\n", "comparison/table.md")
    # The run's description (Markdown on its Overview page in the UI): the table itself.
    diagnoses = "".join(f"\n- {o.method}, seed {o.seed}: {o.diagnosis}" for o in outcomes if o.diagnosis)
    why = f"\n\nRuns that could not improve, and why:{diagnoses}" if diagnoses else ""
    mlflow.set_tag("mlflow.note.content", f"{table}\n\n{timing}{why}\n\nChild runs: one per method and seed.")
    mlflow.log_dict([o.__dict__ for o in outcomes], "comparison/runs.json")
    for row in rows:
        mlflow.log_metric(f"{row['method']}_test_score_mean", row["test_score_mean"], timestamp=stamp)
        mlflow.log_metric(f"{row['method']}_test_score_std", row["test_score_std"], timestamp=stamp)


def dry_run(settings: Settings, methods: list[str], seeds: int, *, budget_match: bool = False) -> str:
    """``compare --dry-run``: every child's estimate (``distillprompt optimize --dry-run``) and
    their sum; no completion request is sent. With --budget-match a searching method gets
    DistillPrompt's estimated scoring requests of the same seed as its budget."""
    order = [REFERENCE, *(m for m in methods if m != REFERENCE)] if budget_match else methods
    rows = ["| method | seed | meta requests | scoring requests | requests | at most | tokens in | tokens out | "
            "cost USD | at most | cached calls |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # counts stay ints and dollars floats as they add up
    totals: list[float] = [0, 0, 0, 0, 0, 0, 0.0, 0.0, 0]
    unestimated = []
    for offset in range(seeds):
        budget: tuple[int, int] | None = None
        for method in order:
            child = child_settings(settings, method, offset, budget)
            estimate = asyncio.run(runner.dry_run(child))
            if estimate is None:
                unestimated.append(f"{method} (seed {child.seed})")
                continue
            if budget_match and method == REFERENCE:
                budget = (estimate.requests - estimate.meta.calls, child.data.train_size or 1)
            figures = [estimate.meta.calls, estimate.requests - estimate.meta.calls, estimate.requests,
                       estimate.requests_max, *estimate.tokens, estimate.cost, estimate.cost_max, estimate.cached]
            totals = [a + b for a, b in zip(totals, figures)]
            rows.append(f"| {method} | {child.seed} | " + " | ".join(map(_figure, figures)) + " |")
    rows.append("| **all** | | " + " | ".join(map(_figure, totals)) + " |")
    if unestimated:
        rows.append(f"\nnot estimated (MLflow's optimizers choose their own calls; --max-scoring-calls bounds their "
                    f"scoring): {', '.join(unestimated)}")
    rows.append("dry run: no completion request was sent (cost: at --price-input / --price-output; 0 without them)")
    return "\n".join(rows)


def _figure(value: float) -> str:
    """A dry-run table cell: dollars (floats) to 4 places, counts (ints) with separators."""
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


class CompareCommand:
    name = "compare"
    help = "run several methods with several seeds under one MLflow run and compare them"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                            help=f"comma list of {', '.join(METHOD_NAMES)} (default {','.join(DEFAULT_METHODS)})")
        parser.add_argument("--seeds", type=int, default=3, help="seeds per method, starting at --seed (default 3)")
        parser.add_argument(
            "--budget-match", action="store_true",
            help="give every searching method the scoring requests DistillPrompt spent with the same seed",
        )

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        if args.seeds < 1:
            raise UserError("--seeds must be at least 1")
        methods = parse_methods(args.methods)
        require_prices(settings)  # each child run has the whole --max-cost of its own
        if settings.dry_run:
            print(dry_run(settings, methods, args.seeds, budget_match=args.budget_match))
            return 0
        table, timing, run_id, unfinished = compare(
            settings, methods, args.seeds, quiet=args.quiet, budget_match=args.budget_match
        )
        print(f"\n{table}\n\n{timing}\n\nMLflow parent run: {run_id}")
        if settings.output is not None:
            folder = Path(settings.output)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "comparison.md").write_text(table + "\n\n" + timing + "\n")
        for text in unfinished:
            print(f"distillprompt: warning: {text}", file=sys.stderr)
        return INCOMPLETE if unfinished else 0

