"""MLflow tracking of a DistillPrompt run: a ``Callback`` that records every round.

Inside ``mlflow run`` it logs into the run MLflow created (``MLFLOW_RUN_ID``); elsewhere it
starts a run in ``--experiment`` when a tracking URI is known (``--tracking-uri`` or
``MLFLOW_TRACKING_URI``). Params are the settings (secrets left out); metrics use
``step = round``; each round adds a candidate table and a checkpoint of the run state; the
end adds prompts, scores, a bootstrap interval, a score plot and the winner's lineage, then
registers the final prompt (see ``registry.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from distillprompt import templates
from distillprompt.data import Task
from distillprompt.errors import UserError
from distillprompt.engine import FLAT_SIGNAL, Callback, RoundResult, RunResult
from distillprompt.settings import Settings
from distillprompt.state import STAGES, Candidate, RunState

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/state.json"
NOTE = "mlflow.note.content"  # a run's description in the MLflow UI
NOTE_MARK = "<!-- distillprompt -->"
NOTE_LIMIT = 8000  # MLflow's longest tag value
SETTINGS_TREE = "settings_tree.json"  # the settings as a tree, secrets left out: what --resume restarts from
CANDIDATE_ALIAS = "candidate"


def tracking_requested(settings: Settings) -> bool:
    return bool(settings.mlflow.tracking_uri or os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_TRACKING_URI"))


def lineage(history: list[Candidate], final: Candidate) -> list[Candidate]:
    """The winner and every candidate it was derived from, oldest first."""
    by_id = {candidate.id: candidate for candidate in history}
    seen: dict[int, Candidate] = {}
    stack = [final.duplicate_of if final.duplicate_of is not None else final.id]
    while stack:
        current = by_id[stack.pop()]
        if current.id in seen:
            continue
        seen[current.id] = current
        for parent in current.parents:
            original = by_id[parent]
            stack.append(original.duplicate_of if original.duplicate_of is not None else original.id)
    return sorted(seen.values(), key=lambda c: c.id)


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


def _param_key(name: str) -> str:
    """A split name as MLflow accepts it in a key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", name)


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class MlflowTracker(Callback):
    def __init__(self, settings: Settings, *, parent_run_id: str | None = None, run_name: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        self.settings = settings
        self.task: Task | None = None
        self.rounds: list[dict[str, float]] = []
        if settings.mlflow.tracking_uri:
            mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
        if settings.mlflow.prompt_name:
            from .registry import check_name

            check_name(settings.mlflow.prompt_name)  # before any work: the name is used at the very end
        _check_reachable(mlflow.get_tracking_uri())
        run_id = os.environ.get("MLFLOW_RUN_ID")
        self.resumed: tuple[Settings, RunState | None] | None = None
        try:
            if settings.resume:
                self.run = mlflow.start_run(run_id=settings.resume)
                if run_id and run_id != settings.resume:  # `mlflow run` made a run of its own: point it here
                    mlflow.MlflowClient().set_tag(run_id, "distillprompt.resumed_run", settings.resume)
            elif parent_run_id:  # a child of a comparison (created by id: MLFLOW_RUN_ID names the parent)
                parent = mlflow.get_run(parent_run_id)
                child = mlflow.MlflowClient().create_run(
                    parent.info.experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id}
                )
                self.run = mlflow.start_run(run_id=child.info.run_id, nested=True)
            elif run_id:
                self.run = mlflow.start_run(run_id=run_id)
            else:
                mlflow.set_experiment(settings.mlflow.experiment)
                self.run = mlflow.start_run(run_name=settings.mlflow.run_name)
        except Exception as error:
            reason = " ".join(str(error).split())[:200]
            raise UserError(
                f"cannot reach the MLflow tracking store {mlflow.get_tracking_uri()} ({reason}): start the server or fix "
                "--tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
        self.run_id = self.run.info.run_id
        self.nested = parent_run_id is not None
        self.registered: Any = None
        self._closed = False
        if settings.resume:
            self.resumed = self._load_resume_point(settings)

    def _load_resume_point(self, given: Settings) -> tuple[Settings, RunState | None]:
        """The settings the run started with (secrets from this environment) and its last checkpoint."""
        from distillprompt.settings import load_settings

        artifacts = self.run.info.artifact_uri
        try:
            tree = self.mlflow.artifacts.load_dict(f"{artifacts}/{SETTINGS_TREE}")
        except Exception:
            raise UserError(
                f"run {given.resume} has no recorded settings ({SETTINGS_TREE}): it was not started by distillprompt; "
                "check the run id given to --resume"
            ) from None
        if tree["llm"].get("backend") == "local":
            tree["llm"]["base_url"] = None  # the embedded server of the killed run is gone; a new one starts
        tree["resume"] = given.resume
        tree["output"] = str(given.output) if given.output else None
        settings = load_settings(tree)
        try:
            state = RunState.from_dict(self.mlflow.artifacts.load_dict(f"{artifacts}/{CHECKPOINT}"))
        except Exception:
            state = None  # killed before its first round finished: it starts again, from the cache
        self.mlflow.set_tag("distillprompt.resumed_from_round", state.round if state else 0)
        return settings, state

    # ----- events ------------------------------------------------------------------------

    def on_settings(self, settings: Settings) -> None:
        self.settings = settings  # what the run really uses: demo defaults, embedded endpoint

    def on_start(self, task: Task, initial: Candidate) -> None:
        mlflow = self.mlflow
        self.task = task
        params: dict[str, Any] = dict(self.settings.public_dict())
        params.update(
            dataset_name=task.name,
            dataset_source=task.source,
            dataset_digest=task.digest(),
            train_examples=len(task.train),
            test_examples=len(task.test),
            val_examples=len(task.val),
            labels=",".join(task.labels),
            initial_prompt_text=initial.prompt,
            **{f"rows_dropped_{_param_key(split)}": sum(counts.values()) for split, counts in task.rows_dropped.items()},
        )
        if task.label_changes:
            mlflow.set_tag("distillprompt.label_changes", " | ".join(task.label_changes)[:5000])
        self._log_params(params)
        mlflow.set_tags({"distillprompt.method": self.settings.optimizer.method, "distillprompt.dataset": task.name})
        if self.settings.mlflow.run_name is None and not os.environ.get("MLFLOW_RUN_ID") and not self.nested:
            mlflow.set_tag("mlflow.runName", f"{task.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self._log_dataset(task)
        mlflow.log_dict(templates.meta_prompt_texts(task), "method/meta_prompts.json")
        mlflow.log_dict(task.describe(), "method/task.json")

    def _log_params(self, params: dict[str, Any]) -> None:
        """Logs the effective settings. Inside `mlflow run`, MLflow has logged the raw MLproject
        parameters under the same names already; where the effective value differs (an empty
        parameter left to a default), it goes in as ``effective_<name>``."""
        values = {
            name: "" if value is None else json.dumps(value) if isinstance(value, list) else str(value)
            for name, value in params.items()
        }
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {}
        for name, value in values.items():
            if name not in existing:
                fresh[name] = value
            elif existing[name] != value and existing[name].strip("'\"") != value:
                fresh[f"effective_{name}"] = value
        if fresh:
            self.mlflow.log_params(fresh)
        self.mlflow.log_dict(values, "settings.json")
        self.mlflow.log_dict(
            json.loads(self.settings.model_dump_json(exclude={"llm": {"api_key"}})), SETTINGS_TREE
        )

    def _log_dataset(self, task: Task) -> None:
        import mlflow.data
        import pandas

        for context, examples in (("train", task.train), ("validation", task.val), ("test", task.test)):
            if not examples:
                continue
            frame = pandas.DataFrame([{**e.inputs, task.label_column: e.target} for e in examples])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a local path "can be interpreted in multiple ways"
                dataset = mlflow.data.from_pandas(
                    frame, source=task.source, name=f"{task.name}-{context}", targets=task.label_column
                )
            self.mlflow.log_input(dataset, context=context)

    def on_round(self, result: RoundResult) -> None:
        metrics = round_metrics(result)
        self.mlflow.log_metrics(metrics, step=result.round)
        self.rounds.append({"round": result.round, **metrics})
        rows = [
            {
                "round": c.round,
                "stage": c.stage,
                "candidate": c.id,
                "parents": ",".join(map(str, c.parents)),
                "prompt": c.prompt,
                "train_score": c.score,
                "val_score": c.val_score,
                "duplicate_of": c.duplicate_of,
                "examples_scored": c.examples_scored,
                "eliminated_by": c.eliminated_by,
            }
            for c in result.candidates
        ]
        if rows:
            self.mlflow.log_table(data=_columns(rows), artifact_file=f"candidates/round_{result.round:03d}.json")
        self.mlflow.log_dict(result.state.to_dict(), CHECKPOINT)

    def on_finish(self, result: RunResult) -> None:
        mlflow = self.mlflow
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
            "wall_time_s": result.wall_time,
            "total_scoring_requests": float(result.race.get("requests", 0)),
            "total_race_saved_fraction": float(result.race.get("saved_fraction", 0.0)),
        }
        for name, scores in (("initial", initial), ("final", final)):
            if (scores.get("val") or {}).get("score") is not None:
                metrics[f"{name}_val_score"] = scores["val"]["score"]
        if result.initial_test is not None and result.final_test is not None and result.verdict is not None:
            # the verdict's paired bootstrap: the same interval the description and the tags give
            mean, low, high = result.verdict.difference, result.verdict.low, result.verdict.high
            metrics.update(
                initial_test_score=initial["test"]["score"],
                final_test_score=final["test"]["score"],
                test_improvement=final["test"]["score"] - initial["test"]["score"],
                test_improvement_ci_low=low,
                test_improvement_ci_high=high,
                paired_mean_difference=mean,
            )
        for split in ("train", "test"):
            for name, value in final[split].items():
                if name not in ("score",):
                    metrics[f"final_{split}_{name}"] = value
            for name, value in initial[split].items():
                if name not in ("score",):
                    metrics[f"initial_{split}_{name}"] = value
        mlflow.log_metrics(metrics)
        mlflow.log_metric("initial_parse_rate", metrics["initial_parse_rate"], step=0)
        mlflow.set_tag("distillprompt.stop_reason", result.stop_reason)
        if result.verdict is not None:
            mlflow.set_tags({
                "distillprompt.test_verdict": result.verdict.outcome,
                "distillprompt.beat_initial_on_test": str(result.verdict.beat_initial).lower(),
            })
        if result.failure:
            mlflow.set_tag("distillprompt.failure", result.failure[:5000])
        mlflow.log_text(result.initial_prompt, "prompts/initial.txt")
        mlflow.log_text(result.final_prompt, "prompts/final.txt")
        mlflow.log_dict(result.to_dict(), "result.json")
        with tempfile.TemporaryDirectory() as folder:
            mlflow.log_artifact(self._plot_rounds(result, Path(folder)), "plots")
            mlflow.log_artifact(self._plot_lineage(result, Path(folder)), "plots")
        mlflow.log_text(self._lineage_text(result), "lineage.md")
        if result.diagnosis:
            mlflow.set_tag("distillprompt.diagnosis", result.diagnosis[:5000])
        # a run stopped for lack of signal registers nothing, unless it found a better prompt all the same
        unchanged = result.stop_reason == FLAT_SIGNAL and result.final.id == result.initial.id
        if self.settings.mlflow.register_result and self.task is not None and result.failure is None and not unchanged:
            from .registry import register_result

            self.registered = register_result(result, self.task, self.settings, self.run_id)
        self._describe(result)

    def _describe(self, result: RunResult) -> None:
        """The run's description (Markdown on its Overview page): the outcome at a glance.

        A description the user wrote (``mlflow.note.content``) is left alone."""
        current = self.mlflow.get_run(self.run_id).data.tags.get(NOTE)
        if current and not current.startswith(NOTE_MARK):
            return
        initial, final = result.initial_scores, result.final_scores
        metric = self.task.metric if self.task is not None else "score"

        def scores(split: str) -> str:
            before, after = (initial.get(split) or {}).get("score"), (final.get(split) or {}).get("score")
            return " → ".join("—" if value is None else f"{value:.4f}" for value in (before, after))

        validation = f", validation {scores('val')}" if (final.get("val") or {}).get("score") is not None else ""
        lines = [
            NOTE_MARK,
            f"**{self.settings.optimizer.method}**, {metric}: test {scores('test')}, train {scores('train')}"
            f"{validation}; stopped by {result.stop_reason}, {len(result.history)} candidates.",
        ]
        if result.diagnosis:
            lines.append(f"\n**No signal**: {result.diagnosis}")
        if result.verdict is not None:
            lines.append(f"\n{result.verdict.sentence}")
        if result.failure:
            lines.append(f"\n**Failed**: {result.failure[:500]} (nothing registered; `--resume {self.run_id}` continues).")
        if self.registered is not None:
            lines.append(f"\nRegistered as `{self.registered.prompt_uri}` and `models:/{self.registered.model_name}/"
                         f"{self.registered.model_version}` (alias `{CANDIDATE_ALIAS}`).")
        lines += ["\nFinal prompt:\n", _blockquote(result.final_prompt), "\nInitial prompt:\n", _blockquote(result.initial_prompt)]
        note = "\n".join(lines)
        if len(note) > NOTE_LIMIT:  # MLflow refuses longer tag values; the prompts are whole in prompts/
            note = note[: NOTE_LIMIT - 80] + "\n\n… (cut here: the whole prompts are in `prompts/`)"
        self.mlflow.set_tag(NOTE, note)

    def on_evaluation(self, task: Task, prompt: str, score: Any, usage: dict[str, Any]) -> None:
        """Records a stand-alone evaluation (``distillprompt evaluate`` / ``-e evaluate``)."""
        mlflow = self.mlflow
        params: dict[str, Any] = dict(self.settings.public_dict())
        params.update(dataset_name=task.name, dataset_digest=task.digest(), test_examples=len(task.test))
        self._log_params(params)
        mlflow.set_tags({"distillprompt.method": "evaluate", "distillprompt.dataset": task.name})
        mlflow.log_metrics({f"test_{name}": value for name, value in score.summary().items()})
        mlflow.log_metrics({"llm_requests": usage["requests"], "cache_hits": usage["cache_hits"]})
        mlflow.log_text(prompt, "prompts/evaluated.txt")
        rows = [
            {"output": o, "prediction": p, "target": t, "score": v}
            for o, p, t, v in zip(score.outputs, score.predictions, score.targets, score.per_example)
        ]
        if rows:
            mlflow.log_table(data=_columns(rows), artifact_file="evaluation/test_outputs.json")

    def on_llm_call(self, call: Any) -> None:
        """With --trace: one MLflow trace per answered LLM request (prompt, reply, tokens)."""
        if not self.settings.mlflow.trace:
            return
        span = self.mlflow.start_span_no_context(
            name=f"llm.{call.stage or 'call'}",
            span_type="CHAT_MODEL",
            inputs={"messages": call.messages, "model": call.model},
            attributes={"stage": call.stage, "tokens_in": call.usage.input_tokens, "tokens_out": call.usage.output_tokens},
            tags={"mlflow.sourceRun": self.run_id},
            experiment_id=self.run.info.experiment_id,
            start_time_ns=int(call.started * 1e9),
        )
        span.set_outputs({"choices": call.texts})
        span.end(end_time_ns=int(call.ended * 1e9))

    # ----- artifacts ---------------------------------------------------------------------

    def _plot_rounds(self, result: RunResult, folder: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        figure, axis = plt.subplots(figsize=(7, 4))
        numbers = [0] + [r["round"] for r in self.rounds]
        best = [result.initial_scores["train"]["score"]] + [r["best_train_score"] for r in self.rounds]
        axis.plot(numbers, best, marker="o", linewidth=2, label="best train score")
        stages = [s for s in dict.fromkeys(c.stage for c in result.history) if s != "initial"]
        for stage in stages:
            points = [(r["round"], r[f"{stage}_best_score"]) for r in self.rounds if f"{stage}_best_score" in r]
            if points:
                axis.plot(*zip(*points), marker=".", linestyle="--", alpha=0.7, label=f"{stage} best")
        if "score" in result.final_scores["test"]:
            axis.axhline(result.final_scores["test"]["score"], color="black", linestyle=":", label="final test score")
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_ylabel("score")
        axis.set_title(f"{self.settings.optimizer.method} on {result.task['name']}")
        axis.legend(fontsize=8, loc="lower right")
        axis.grid(alpha=0.3)
        path = folder / "score_per_round.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def _plot_lineage(self, result: RunResult, folder: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chain = lineage(result.history, result.final)
        order = {"initial": 0, **{stage: i + 1 for i, stage in enumerate(STAGES)}}
        for candidate in chain:
            order.setdefault(candidate.stage, len(order))
        columns: dict[tuple[int, int], list[Candidate]] = {}
        for candidate in chain:
            columns.setdefault((candidate.round, order[candidate.stage]), []).append(candidate)
        keys = sorted(columns)
        position: dict[int, tuple[float, float]] = {}
        for x, key in enumerate(keys):
            for y, candidate in enumerate(columns[key]):
                position[candidate.id] = (x, -y)
        figure, axis = plt.subplots(figsize=(max(6, 1.9 * len(keys)), max(3, 1.2 * max(len(v) for v in columns.values()) + 1.5)))
        for candidate in chain:
            for parent in candidate.parents:
                source = result.history[parent]
                source_id = source.duplicate_of if source.duplicate_of is not None else source.id
                if source_id in position:
                    axis.annotate(
                        "", xy=position[candidate.id], xytext=position[source_id],
                        arrowprops={"arrowstyle": "-|>", "color": "grey", "shrinkA": 28, "shrinkB": 28, "mutation_scale": 14},
                    )
        for candidate in chain:
            x, y = position[candidate.id]
            winner = candidate.id == result.final.id or candidate.id == result.final.duplicate_of
            axis.text(
                x, y, f"#{candidate.id} {candidate.stage}\nround {candidate.round}\nscore {candidate.score or 0:.3f}",
                ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "facecolor": "gold" if winner else "white", "edgecolor": "black"},
            )
        axis.set_xlim(-0.7, len(keys) - 0.3)
        axis.set_ylim(min(p[1] for p in position.values()) - 0.7, 0.7)
        axis.axis("off")
        axis.set_title("How the final prompt was derived")
        path = folder / "lineage.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def _lineage_text(self, result: RunResult) -> str:
        lines = ["# Lineage of the final prompt", ""]
        for candidate in lineage(result.history, result.final):
            parents = ", ".join(f"#{p}" for p in candidate.parents) or "none"
            lines.append(
                f"- **#{candidate.id}** {candidate.stage}, round {candidate.round}, train score "
                f"{candidate.score or 0:.4f}, from {parents}: {candidate.prompt}"
            )
        return "\n".join(lines) + "\n"

    # ----- end ---------------------------------------------------------------------------

    def on_end(self, succeeded: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self.registered is not None:
            print(
                f"registered prompt {self.registered.name} version {self.registered.prompt_version} "
                f"(alias {CANDIDATE_ALIAS}) and model {self.registered.model_name} version {self.registered.model_version}",
                file=sys.stderr,
            )
        self.mlflow.end_run(status="FINISHED" if succeeded else "FAILED")


def _blockquote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])


def _check_reachable(uri: str) -> None:
    """A tracking server that does not answer fails the run at once, not after MLflow's own
    minutes of retries."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers (a server with another health route, or auth in front): let MLflow tell
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(
            f"cannot reach the MLflow tracking server {uri} ({reason}): start it or fix --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None


def make_tracker(settings: Settings) -> MlflowTracker | None:
    """Entry point ``distillprompt.callbacks: mlflow``: a tracker when tracking was asked for."""
    if not tracking_requested(settings):
        return None
    return MlflowTracker(settings)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in rows[0]}
