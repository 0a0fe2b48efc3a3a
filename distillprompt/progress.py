"""Progress display on the terminal: one line per stage and round, and a live request counter."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .data import Task
from .engine import Callback, RoundResult, RunResult, StageEvent
from .state import Candidate


def _short(prompt: str, width: int = 90) -> str:
    flat = " ".join(prompt.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class ConsoleProgress(Callback):
    """Writes to stderr. On a terminal a tqdm progress bar per round shows the stage being
    scored, the scoring requests answered out of those planned so far, the elapsed time and
    an estimate of the time left; elsewhere (a log file, CI) a plain line every 15 s."""

    def __init__(self, stream: TextIO | None = None, rounds: int = 0, interval: float = 15.0) -> None:
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.rounds = rounds
        self.interval = interval
        self.planned = 0
        self.done = 0
        self.phase = "initial prompt"
        self._last_draw = time.monotonic()
        self._bar: Any = None

    # counters fed by the evaluator -------------------------------------------------------

    def requests_planned(self, count: int) -> None:
        self.planned += count
        if self.live:
            bar = self._live_bar()
            bar.total = self.planned
            bar.refresh()
        else:
            self._draw()

    def requests_done(self, count: int) -> None:
        self.done += count
        if self.live:
            self._live_bar().update(count)
        else:
            self._draw()

    def _live_bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.planned, initial=self.done, desc=self.phase, unit="req", file=self.stream,
                leave=False, dynamic_ncols=True, mininterval=0.25,
            )
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _new_phase(self, phase: str) -> None:
        """A new bar for the next round (or the test scoring): counts start again."""
        self._close_bar()
        self.phase, self.planned, self.done = phase, 0, 0

    def _draw(self) -> None:
        now = time.monotonic()
        if now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self.stream.write(f"{self.phase}: {self.done}/{self.planned} scoring requests answered\n")
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)  # above the bar, which stays drawn
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    # optimizer events --------------------------------------------------------------------

    def on_settings(self, settings: object) -> None:
        from .methods import method_for

        optimizer = settings.optimizer  # type: ignore[attr-defined]
        self.rounds = method_for(optimizer.method).rounds(optimizer)

    def on_start(self, task: Task, initial: Candidate) -> None:
        labels = f", labels {', '.join(task.labels)}" if task.labels else ""
        self._line(
            f"task {task.name}: {task.task_type}{labels}; train {len(task.train)}, test {len(task.test)} examples"
        )
        self._line(f"initial prompt: {_short(initial.prompt)}")

    def on_estimate(self, estimate: Any) -> None:
        self._line(estimate.line())

    def on_stage(self, event: StageEvent) -> None:
        rejected = sum(event.rejected.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(event.rejected.items()))
        dropped = f", {rejected} dropped ({reasons})" if rejected else ""
        duplicates = sum(1 for c in event.candidates if c.duplicate_of is not None)
        repeated = f", {duplicates} already scored" if duplicates else ""
        of = f"/{self.rounds}" if self.rounds else ""
        self._line(f"round {event.round}{of} {event.stage:<10} {len(event.candidates)} candidates{repeated}{dropped}")
        self.phase = f"round {event.round}{of} {event.stage}"
        if self._bar is not None:
            self._bar.set_description_str(self.phase)

    def on_round(self, result: RoundResult) -> None:
        usage = result.usage
        marker = "improved" if result.improved else "no gain"
        stop = f"; stopping: {result.stop_reason}" if result.stop_reason else ""
        diagnosis = f"; {result.diagnosis.summary()}" if result.diagnosis else ""
        race = f"; {result.race.line()}" if result.race.candidates else ""
        self._line(
            f"round {result.round} done in {result.wall_time:.1f}s: best train score {result.best.score:.4f} ({marker}), "
            f"{usage.requests} requests, {usage.cache_hits} cache hits, {usage.tokens} tokens{race}{diagnosis}{stop}"
        )
        if result.diagnosis is not None and result.diagnosis.sentence:
            self._line(result.diagnosis.sentence)
        self._new_phase(f"round {result.round + 1}" + (f"/{self.rounds}" if self.rounds else ""))

    def on_rounds_done(self, state: Any) -> None:
        self._new_phase("test sample")

    def on_finish(self, result: RunResult) -> None:
        self._close_bar()

    def on_end(self, succeeded: bool) -> None:
        self._close_bar()
