"""``MlflowTracker``: the callback that records a run in MLflow, event by event.

Inside ``mlflow run`` it logs into the run MLflow created (``MLFLOW_RUN_ID``); elsewhere it
starts a run in ``--experiment`` when a tracking URI is known (``--tracking-uri`` or
``MLFLOW_TRACKING_URI``). Params are the settings (secrets left out); metrics use ``step =
round``; each round adds a candidate table and a checkpoint of the run state; the end adds
prompts, scores, plots and the winner's lineage, then registers the final prompt
(``registry.py``).
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from distillprompt import templates
from distillprompt.data import Task
from distillprompt.errors import UserError
from distillprompt.engine import FLAT_SIGNAL, Callback, RoundResult, RunResult
from distillprompt.settings import Settings
from distillprompt.state import Candidate
from distillprompt.urls import masked

from .artifacts import CANDIDATE_ALIAS, describe, log_evaluation, log_result, log_round, round_table
from .outbox import Outbox, error_line
from .metrics import final_metrics, param_key, round_metrics
from .params import log_datasets, log_settings
from .runs import CHECKPOINT, SETTINGS_TREE, connect, start_run, tracking_requested
from .tracing import trace_call

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


def tracked(event: Callable[..., None]) -> Callable[..., None]:
    """An event whose MLflow calls go to the outbox: the loop goes on at once, and a server
    that stops answering holds only the outbox (``outbox.py``)."""

    @functools.wraps(event)
    def queued(self: MlflowTracker, *args: Any) -> None:
        self.outbox.submit(event.__name__, functools.partial(event, self, *args))

    return queued


class MlflowTracker(Callback):
    def __init__(self, settings: Settings, *, parent_run_id: str | None = None, run_name: str | None = None) -> None:
        self.settings = settings
        self.task: Task | None = None
        if settings.mlflow.prompt_name:
            from ..registry import check_name

            check_name(settings.mlflow.prompt_name)  # before any work: the name is used at the very end
        self.mlflow = connect(settings)
        # MLflow keeps the active run per thread (mlflow.active_run): the run starts in a thread
        # of its own and is active only in the outbox's (_attach), never in this one. So a run
        # whose server went away needs no end_run in this thread, which would call that server
        # for its whole retry budget (and MLflow's exit hook would, marking the run FINISHED),
        # and a comparison's next child starts beside a lost one.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distillprompt-start") as starter:
            self.run = starter.submit(start_run, self.mlflow, settings, parent_run_id, run_name).result()
        self.run_id = self.run.info.run_id
        self.nested = parent_run_id is not None
        self.registered: Any = None
        self.rounds_recorded = 0
        self.lost: str | None = None  # why tracking was given up, with calls left unmade
        self._closed = False
        self._logged_rounds: set[int] | None = None  # the rounds with metrics, read once
        self.outbox = Outbox(self.mlflow.get_tracking_uri(), wait=settings.mlflow.tracking_wait, attach=self._attach)

    def _attach(self) -> None:
        """The run, active in the outbox's thread too (MLflow keeps the active run per thread)."""
        self.mlflow.start_run(run_id=self.run_id)

    def record(self, name: str, call: Callable[[], None]) -> None:
        """Makes ``call`` (MLflow calls on this run) in order with the tracker's own: for a
        comparison's parent table."""
        self.outbox.submit(name, call)

    # ----- events ------------------------------------------------------------------------

    def on_settings(self, settings: Settings) -> None:
        self.settings = settings  # what the run really uses: demo defaults, embedded endpoint, a resumed run's
        # what --resume restarts from, at once and not through the outbox: a run killed before
        # the outbox got to it could not be resumed (the server answered a moment ago)
        tree = settings.recorded_tree()
        record = functools.partial(self.mlflow.MlflowClient().log_dict, self.run_id, tree, SETTINGS_TREE)
        try:
            record()
        except Exception:  # noqa: BLE001 - the server went away already: the outbox holds it
            self.outbox.submit("settings", record)

    def on_start(self, task: Task, initial: Candidate) -> None:
        self.task = task  # here, not in the outbox: the run's end decides on it
        self.outbox.submit("run start", functools.partial(self._record_start, task, initial))

    def _record_start(self, task: Task, initial: Candidate) -> None:
        mlflow = self.mlflow
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
            **{f"rows_dropped_{param_key(split)}": sum(counts.values()) for split, counts in task.rows_dropped.items()},
        )
        if task.label_changes:
            mlflow.set_tag("distillprompt.label_changes", " | ".join(task.label_changes)[:5000])
        log_settings(self.mlflow, self.run_id, params)
        mlflow.set_tags({"distillprompt.method": self.settings.optimizer.method, "distillprompt.dataset": task.name})
        if (self.settings.mlflow.run_name is None and not os.environ.get("MLFLOW_RUN_ID") and not self.nested
                and not self.settings.resume):  # a resumed run keeps its name
            mlflow.set_tag("mlflow.runName", f"{task.name}-{datetime.now():%Y%m%d-%H%M%S}")
        log_datasets(self.mlflow, task)
        mlflow.log_dict(templates.meta_prompt_texts(task), "method/meta_prompts.json")
        mlflow.log_dict(task.describe(), "method/task.json")

    def on_estimate(self, estimate: Any) -> None:
        """The estimate beside what the run will spend: params ``estimated_*``, and the whole of it."""
        params, whole = estimate.params(), estimate.to_dict()

        def record() -> None:
            existing = self.mlflow.get_run(self.run_id).data.params  # a resumed run keeps its first estimate
            fresh = {name: str(value) for name, value in params.items() if name not in existing}
            if fresh:
                self.mlflow.log_params(fresh)
                self.mlflow.log_dict(whole, "estimate.json")

        self.outbox.submit("estimate", record)

    def on_round(self, result: RoundResult) -> None:
        # a copy: the loop goes on changing the run state while the outbox records the round
        result = copy.deepcopy(result)
        # steps of their own, each made once: a step the server failed is made again, not the
        # ones before it; the time is the round's, so a metric the server took before its
        # answer was lost is the same record when made again (a store keeps one of each)
        stamp = now_ms()
        # the checkpoint right after the metrics: what --resume restarts from, soonest
        self.outbox.submit(f"round {result.round} metrics", functools.partial(self._round_metrics, result, stamp))
        self.outbox.submit(f"round {result.round} checkpoint", functools.partial(self._checkpoint, result))
        self.outbox.submit(f"round {result.round} candidates", functools.partial(self._round_table, result))

    def _round_metrics(self, result: RoundResult, stamp: int) -> None:
        if self._logged_rounds is None or self.outbox.replaying:
            self._logged_rounds = set()
            # a resumed run may hold metrics of a round its checkpoint did not reach, and a
            # call made again may have reached the server the first time
            if self.settings.resume or self.outbox.replaying:
                history = self.mlflow.MlflowClient().get_metric_history(self.run_id, "best_train_score")
                self._logged_rounds = {metric.step for metric in history}
        if result.round not in self._logged_rounds:
            self.mlflow.log_metrics(round_metrics(result), step=result.round, timestamp=stamp)
            self._logged_rounds.add(result.round)

    def _round_table(self, result: RoundResult) -> None:
        # a table logged again is appended to the one there (mlflow.log_table): made once
        if (self.settings.resume or self.outbox.replaying) and self._has_artifact(round_table(result)):
            return
        log_round(self.mlflow, result)

    def _has_artifact(self, path: str) -> bool:
        folder = path.rpartition("/")[0] or None
        listed = self.mlflow.MlflowClient().list_artifacts(self.run_id, folder)
        return any(entry.path == path for entry in listed)

    def _checkpoint(self, result: RoundResult) -> None:
        self.mlflow.log_dict(result.state.to_dict(), CHECKPOINT)
        self.rounds_recorded = result.round

    def on_finish(self, result: RunResult) -> None:
        # steps of their own: a step the server failed is made again, not the ones before it
        self.outbox.submit("final scores", functools.partial(self._record_final, result, now_ms()))
        # a run stopped for lack of signal registers nothing, unless it found a better prompt all the same
        unchanged = result.stop_reason == FLAT_SIGNAL and result.final.id == result.initial.id
        if self.settings.mlflow.register_result and self.task is not None and result.failure is None and not unchanged:
            self.outbox.submit("registration", functools.partial(self._register, result))
        self.outbox.submit("description", functools.partial(self._describe, result))

    def _record_final(self, result: RunResult, stamp: int) -> None:
        mlflow = self.mlflow
        metrics = final_metrics(result)
        # the time fixed: made again, the same record; a resumed run whose final scores were
        # recorded before (the registry refused) does not add a second point of each
        recorded = self.settings.resume and "final_test_score" in mlflow.get_run(self.run_id).data.metrics
        if not recorded:
            mlflow.log_metrics(metrics, timestamp=stamp)
            mlflow.log_metric("initial_parse_rate", metrics["initial_parse_rate"], step=0, timestamp=stamp)
        mlflow.set_tag("distillprompt.stop_reason", result.stop_reason)
        if result.verdict is not None:
            mlflow.set_tags({
                "distillprompt.test_verdict": result.verdict.outcome,
                "distillprompt.beat_initial_on_test": str(result.verdict.beat_initial).lower(),
            })
        if result.failure:
            mlflow.set_tag("distillprompt.failure", result.failure[:5000])
        log_result(mlflow, result, self.settings.optimizer.method)
        if self.task is not None:
            import tempfile

            from distillprompt import pareto

            llm = self.settings.llm
            rows = pareto.candidate_rows(result, self.task, llm.price_input, llm.price_output)
            with tempfile.TemporaryDirectory() as folder:
                pareto.write(rows, Path(folder), f"{self.task.name}: score against prompt length")
                mlflow.log_artifacts(folder, "pareto")
        if result.diagnosis:
            mlflow.set_tag("distillprompt.diagnosis", result.diagnosis[:5000])

    def _register(self, result: RunResult) -> None:
        from ..registry import register_result

        assert self.task is not None
        self.registered = register_result(result, self.task, self.settings, self.run_id)

    def _describe(self, result: RunResult) -> None:
        metric = self.task.metric if self.task is not None else "score"
        describe(self.mlflow, self.run_id, result, self.settings.optimizer.method, metric, self.registered)

    @tracked
    def on_evaluation(self, task: Task, prompt: str, score: Any, usage: dict[str, Any]) -> None:
        """Records a stand-alone evaluation (``distillprompt evaluate`` / ``-e evaluate``)."""
        mlflow = self.mlflow
        params: dict[str, Any] = dict(self.settings.public_dict())
        params.update(dataset_name=task.name, dataset_digest=task.digest(), test_examples=len(task.test))
        log_settings(self.mlflow, self.run_id, params)
        mlflow.set_tags({"distillprompt.method": "evaluate", "distillprompt.dataset": task.name})
        mlflow.log_metrics({f"test_{name}": value for name, value in score.summary().items()})
        mlflow.log_metrics({"llm_requests": usage["requests"], "cache_hits": usage["cache_hits"]})
        log_evaluation(mlflow, prompt, score)

    def wants_llm_calls(self) -> bool:  # type: ignore[override] - per tracker, not per class
        return self.settings.mlflow.trace

    @tracked
    def on_llm_call(self, call: Any) -> None:
        """With --trace: one MLflow trace per answered LLM request (prompt, reply, tokens)."""
        trace_call(self.mlflow, self.run, call)

    def on_end(self, succeeded: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.lost = self.outbox.close()  # waits for the calls left; gives up on a server gone too long
        if self.registered is not None:
            print(
                f"registered prompt {self.registered.name} version {self.registered.prompt_version} "
                f"(alias {CANDIDATE_ALIAS}) and model {self.registered.model_name} version {self.registered.model_version}",
                file=sys.stderr,
            )
        if self.lost is None:
            try:
                self.mlflow.MlflowClient().set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")
            except Exception as error:  # noqa: BLE001 - the server went away after the last queued call
                self.lost = error_line(error)
                self.outbox.failed = "the end of the run"
        # a run whose tracking was lost stays RUNNING until --resume completes it: nothing calls
        # the server to end it (MLflow's exit hook ends this thread's active run, and this
        # thread never had one)

    def incomplete(self) -> str | None:
        if self.lost is None and self.outbox.faults:
            left_out = "; ".join(f"{call} ({error})" for call, error in self.outbox.faults)
            return (f"the MLflow record of run {self.run_id} is incomplete: the server refused or a call failed, so "
                    f"these parts were left out: {left_out} (traceback above); everything else was recorded, and "
                    "result.json holds the whole result")
        if self.lost is None:
            return None
        if self.task is None:  # an evaluation: nothing to resume, the same command records it
            return (f"MLflow tracking was lost at {self.outbox.failed or 'the run'} ({self.lost}); run the same "
                    "command again once the server answers (the response cache answers what was paid for)")
        uri = self.mlflow.get_tracking_uri()
        return (
            f"MLflow tracking was lost at {self.outbox.failed or 'the run'}, with {self.rounds_recorded} round(s) recorded "
            f"({self.lost}); the result is in "
            f"result.json. Once the server answers, complete the MLflow record (rounds, artifacts, registration) with: "
            f"distillprompt optimize --resume {self.run_id} --tracking-uri {masked(uri)} "
            + ("(the tracking URI's credentials put back where *** stands) " if masked(uri) != uri else "")
            + ("(the response cache answers what the run already paid for)" if self.settings.cache.enabled else
               "(this run had no response cache (--no-cache), so that command sends again the requests of the "
               "rounds after the last one recorded)")
        )


def make_tracker(settings: Settings) -> MlflowTracker | None:
    """Entry point ``distillprompt.callbacks: mlflow``: a tracker when tracking was asked for."""
    if not tracking_requested(settings):
        return None
    return MlflowTracker(settings)
