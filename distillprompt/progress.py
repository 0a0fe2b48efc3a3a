"""Progress display on the terminal: one line per stage and round, and a live request counter."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .data import Task
from .optimizer import Callback, RoundResult, RunResult, StageEvent
from .state import Candidate


def _short(prompt: str, width: int = 90) -> str:
    flat = " ".join(prompt.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class ConsoleProgress(Callback):
    """Writes to stderr; on a terminal a status line counts scoring requests as they finish."""

    def __init__(self, stream: TextIO | None = None, epochs: int = 0, interval: float = 0.25) -> None:
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.epochs = epochs
        self.interval = interval if self.live else 15.0
        self.planned = 0
        self.done = 0
        self._last_draw = 0.0 if self.live else time.monotonic()
        self._status_shown = False

    # counters fed by the evaluator -------------------------------------------------------

    def requests_planned(self, count: int) -> None:
        self.planned += count
        self._draw()

    def requests_done(self, count: int) -> None:
        self.done += count
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        text = f"scoring: {self.done}/{self.planned} requests answered"
        if self.live:
            self.stream.write("\r\x1b[2K" + text)
            self._status_shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[2K")
            self._status_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.live and self.done < self.planned:
            self._draw(force=True)

    # optimizer events --------------------------------------------------------------------

    def on_settings(self, settings: object) -> None:
        from .baselines import METHODS

        optimizer = settings.optimizer  # type: ignore[attr-defined]
        self.epochs = METHODS[optimizer.method].planned_rounds(optimizer)

    def on_start(self, task: Task, initial: Candidate) -> None:
        labels = f", labels {', '.join(task.labels)}" if task.labels else ""
        self._line(
            f"task {task.name}: {task.task_type}{labels}; train {len(task.train)}, test {len(task.test)} examples"
        )
        self._line(f"initial prompt: {_short(initial.prompt)}")

    def on_stage(self, event: StageEvent) -> None:
        rejected = sum(event.rejected.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(event.rejected.items()))
        dropped = f", {rejected} dropped ({reasons})" if rejected else ""
        duplicates = sum(1 for c in event.candidates if c.duplicate_of is not None)
        repeated = f", {duplicates} already scored" if duplicates else ""
        of = f"/{self.epochs}" if self.epochs else ""
        self._line(f"round {event.epoch}{of} {event.stage:<10} {len(event.candidates)} candidates{repeated}{dropped}")

    def on_round(self, result: RoundResult) -> None:
        usage = result.usage
        marker = "improved" if result.improved else "no gain"
        stop = f"; stopping: {result.stop_reason}" if result.stop_reason else ""
        diagnosis = f"; {result.diagnosis.summary()}" if result.diagnosis else ""
        self._line(
            f"round {result.epoch} done in {result.wall_time:.1f}s: best train score {result.best.score:.4f} ({marker}), "
            f"{usage.requests} requests, {usage.cache_hits} cache hits, {usage.tokens} tokens{diagnosis}{stop}"
        )
        if result.diagnosis is not None and result.diagnosis.sentence:
            self._line(result.diagnosis.sentence)

    def on_finish(self, result: RunResult) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[2K")
            self._status_shown = False
            self.stream.flush()
