"""The numbers a run logs to MLflow: per round (step = round) and for the whole run. The
tracker and ``optimize_prompts``' round logger log the same ones."""

from __future__ import annotations

import re

from distillprompt.engine import RoundResult, RunResult


def round_metrics(result: RoundResult) -> dict[str, float]:
    """A round's MLflow metrics (logged at step = round): best score, candidates, usage,
    parse rate, diagnosis, validation, per-stage scores and what racing saved."""
    usage = result.usage
    scored = [c for c in result.candidates if c.duplicate_of is None and c.score is not None]
    metrics: dict[str, float] = {
        "best_train_score": result.best.score or 0.0,
        "candidates": len(result.candidates),
        "candidates_scored": len(scored),
        "llm_requests": usage.requests,
        "cache_hits": usage.cache_hits,
        "tokens_in": usage.input_tokens,
        "tokens_out": usage.output_tokens,
        "cost_usd": usage.cost,
        "retries": usage.retries,
        "failed_requests": usage.failed,
        "throttled_429": usage.throttled,
        "refused_requests": usage.refusals,
        "parameter_refusals": usage.parameter_refusals,
        "reasoning_tokens": usage.reasoning_tokens,
        "round_wall_time_s": result.wall_time,
        "dropped_replies": sum(sum(r.values()) for r in result.rejections.values()),
    }
    if scored:
        metrics["parse_rate"] = sum(c.parse_rate or 0.0 for c in scored) / len(scored)
    for name, value in result.concurrency.items():  # the bound (auto adapts it) and its use
        metrics[f"concurrency_{name}"] = value
    if result.diagnosis is not None:
        metrics.update(result.diagnosis.metrics())
    if result.best.val_score is not None:
        metrics["best_val_score"] = result.best.val_score
        metrics["candidates_validated"] = sum(1 for c in scored if c.val_score is not None)
    for stage, stats in result.stage_stats.items():
        metrics[f"{stage}_mean_score"] = stats["mean"]
        if "best" in stats:  # some of the stage's candidates were scored on the whole train sample
            metrics[f"{stage}_best_score"] = stats["best"]
    metrics.update(result.race.metrics())
    return metrics


def final_metrics(result: RunResult) -> dict[str, float]:
    """The run's MLflow metrics (logged once, at the end): both prompts' scores by sample, the
    test verdict's paired interval, usage and what racing saved."""
    initial, final = result.initial_scores, result.final_scores
    usage = result.usage
    metrics = {
        "initial_parse_rate": initial["train"].get("parse_rate", 0.0),
        "initial_train_score": initial["train"]["score"],
        "final_train_score": final["train"]["score"],
        "total_llm_requests": usage.requests,
        "total_cache_hits": usage.cache_hits,
        "total_failed_requests": usage.failed,
        "total_retries": usage.retries,
        "total_tokens_in": usage.input_tokens,
        "total_tokens_out": usage.output_tokens,
        "total_cost_usd": usage.cost,
        "total_refused_requests": usage.refusals,
        "total_parameter_refusals": usage.parameter_refusals,
        "total_reasoning_tokens": usage.reasoning_tokens,
        "refused_examples": len(result.refused),
        "wall_time_s": result.wall_time,
        "total_scoring_requests": float(result.race.get("requests", 0)),
        "total_race_saved_fraction": float(result.race.get("saved_fraction", 0.0)),
    }
    for name, scores in (("initial", initial), ("final", final)):
        if (scores.get("val") or {}).get("score") is not None:
            metrics[f"{name}_val_score"] = scores["val"]["score"]
    if result.initial_test is not None and result.final_test is not None and result.verdict is not None:
        # the verdict's paired bootstrap of the score's metric (macro-F1 for classification):
        # the same interval the description and the tags give; accuracy's beside it
        verdict = result.verdict
        metrics.update(
            initial_test_score=initial["test"]["score"],
            final_test_score=final["test"]["score"],
            test_improvement=final["test"]["score"] - initial["test"]["score"],
            test_improvement_ci_low=verdict.low,
            test_improvement_ci_high=verdict.high,
            paired_mean_difference=verdict.difference,
        )
        if verdict.accuracy_difference is not None:
            metrics.update(
                test_accuracy_improvement=verdict.accuracy_difference,
                test_accuracy_improvement_ci_low=verdict.accuracy_low,
                test_accuracy_improvement_ci_high=verdict.accuracy_high,
            )
    for split in ("train", "test"):
        for name, value in final[split].items():
            if name not in ("score",):
                metrics[f"final_{split}_{name}"] = value
        for name, value in initial[split].items():
            if name not in ("score",):
                metrics[f"initial_{split}_{name}"] = value
    return metrics


def param_key(name: str) -> str:
    """A split name as MLflow accepts it in a key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", name)
