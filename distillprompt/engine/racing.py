"""Racing: a new candidate's train score paid for block by block, only while it can still win.

Selection reads train scores, and a precise train score costs many requests. A race scores a
batch of new candidates on the train sample in blocks of ``block`` examples, in one seeded
order that every candidate of the run shares, so that each candidate is compared with the
incumbent (the best prompt so far) on the very same examples. After each block but the last,
a one-sided paired permutation test on every example scored so far asks whether the
candidate's selection metric (macro-F1 for classification, ``paired.is_worse``) is lower
than the incumbent's, or than the batch's leader's (the highest metric so far); at
``p < alpha`` it stops there, with the score of the examples it was scored on, and can no longer be
selected: a candidate clearly behind a batch-mate is very unlikely to end with the highest
score (CAPO, in promptolution, tests every candidate against the others in this way). A
candidate that is never found worse ends up scored on the whole train sample, exactly as
full scoring would have scored it.

The incumbent's per-example scores come from its own (full) train scoring: it is never
scored again. Blocks of all the candidates of one batch that are still in the race go to the
evaluator together, through the run's limiter and executor; races of different batches (the
stages of a round) run side by side.
"""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..data import Example, Task
from ..evaluation import Evaluator, Score, merge_scores
from ..paired import is_worse, label_codes, metric_of, record_of


def race_order(size: int, seed: int) -> list[int]:
    """The run's one order of the train positions (a seeded shuffle): blocks are cut from it."""
    order = list(range(size))
    random.Random(f"{seed}:race").shuffle(order)
    return order


_warm_up: threading.Thread | None = None
_warm_up_lock = threading.Lock()


def start_warm_up() -> None:
    """Starts importing the test's library (scipy.stats, a slow import) in a thread of its
    own, once per process, so that the run's first test does not stall the event loop for it.
    Code that runs other imports in threads under a lock of its own (MLflow's ``eval_fn``
    with its import hooks) waits for it first: ``wait_warm_up`` (docs/decisions.md)."""
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None:
            _warm_up = threading.Thread(target=_import_statistics, name="distillprompt-race-import", daemon=True)
            _warm_up.start()


def wait_warm_up() -> None:
    """Blocks until the import ``start_warm_up`` started is done (at once if none was)."""
    if _warm_up is not None:
        _warm_up.join()


def _import_statistics() -> None:
    import scipy.stats  # noqa: F401


@dataclass
class RaceOutcome:
    """How one candidate left the race."""

    score: Score  # on the examples it was scored on; in train order when it finished
    positions: list[int]  # the train positions ``score`` covers, in its order
    stopped: bool  # found worse than the incumbent or the batch's leader before the last block
    by: int | None = None  # the batch position of the leader that stopped it; None: the incumbent


class Race:
    """Scores one batch of candidates block by block against the incumbent's train record
    (``incumbent``, in train order: ``paired.record_of``)."""

    def __init__(
        self, evaluator: Evaluator, task: Task, order: list[int], block: int, alpha: float,
        incumbent: list[float], stage: str,
    ) -> None:
        self.evaluator = evaluator
        self.task = task
        self.blocks = [order[start:start + block] for start in range(0, len(order), block)]
        self.alpha = alpha
        self.incumbent = incumbent
        self.stage = stage
        self.labels = task.labels if task.is_classification else None
        self.label_count = len(task.labels) if task.is_classification else None
        self.targets = label_codes(task.labels, [e.target for e in task.train]) if task.is_classification else None

    async def run(self, prompts: list[str]) -> list[RaceOutcome]:
        parts: list[list[Score]] = [[] for _ in prompts]
        so_far: list[list[float]] = [[] for _ in prompts]  # records on ``seen``
        seen: list[int] = []
        alive = list(range(len(prompts)))
        stopped: dict[int, int | None] = {}  # batch position -> who stopped it (None: the incumbent)
        train: list[Example] = self.task.train
        for number, block in enumerate(self.blocks):
            if not alive:
                break
            scores = await self.evaluator.score([prompts[i] for i in alive], [train[p] for p in block], stage=self.stage)
            seen = seen + block
            for i, score in zip(alive, scores):
                parts[i].append(score)
                so_far[i].extend(record_of(score, self.labels))
            if number == len(self.blocks) - 1:
                break
            incumbent = [self.incumbent[p] for p in seen]
            targets = None if self.targets is None else [self.targets[p] for p in seen]
            # the batch's leader: the highest metric so far (the first on ties), tested as the incumbent is
            leader = max(alive, key=lambda i: (self._metric(so_far[i], targets), -i))
            still = []
            for i in alive:
                if is_worse(so_far[i], incumbent, targets, self.label_count, self.alpha):
                    stopped[i] = None
                elif i != leader and is_worse(so_far[i], so_far[leader], targets, self.label_count, self.alpha):
                    stopped[i] = leader
                else:
                    still.append(i)
            alive = still
        outcomes = []
        for i, own in enumerate(parts):
            positions = seen[: len(so_far[i])]
            merged = merge_scores(self.task, own)
            if i in stopped:
                outcomes.append(RaceOutcome(merged, positions, stopped=True, by=stopped[i]))
            else:
                outcomes.append(RaceOutcome(_in_train_order(merged, positions), sorted(positions), stopped=False))
        return outcomes

    def _metric(self, record: list[float], targets: list[int] | None) -> float:
        truth = None if targets is None else np.asarray(targets, dtype=float)
        return float(metric_of(np.asarray(record, dtype=float), truth, self.label_count))


def _in_train_order(score: Score, positions: list[int]) -> Score:
    """A score over every train position, reordered from race order to train order."""
    rank = sorted(range(len(positions)), key=positions.__getitem__)

    def reorder(values: list[Any]) -> list[Any]:
        return [values[i] for i in rank] if len(values) == len(positions) else list(values)

    return Score(
        value=score.value, metrics=dict(score.metrics), outputs=reorder(score.outputs),
        predictions=reorder(score.predictions), targets=reorder(score.targets), parse_rate=score.parse_rate,
        per_example=reorder(score.per_example), notes=reorder(score.notes), refused=reorder(score.refused),
    )


@dataclass
class RaceSummary:
    """What scoring a round's new candidates cost, against scoring each on the whole sample."""

    candidates: int = 0  # new distinct candidates scored on train
    stopped: int = 0  # of them, stopped as worse than the incumbent
    stopped_after: list[int] = field(default_factory=list)  # examples each stopped candidate was scored on
    requests: int = 0  # train scoring requests they cost
    full_requests: int = 0  # what the whole train sample for each would have cost

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.requests / self.full_requests if self.full_requests else 0.0

    def add(self, other: RaceSummary) -> None:
        self.candidates += other.candidates
        self.stopped += other.stopped
        self.stopped_after += other.stopped_after
        self.requests += other.requests
        self.full_requests += other.full_requests

    def line(self) -> str:
        """The short form for the round's summary line."""
        text = f"scoring {self.requests}/{self.full_requests} requests ({self.saved_fraction:.0%} saved)"
        if self.stopped:
            low, high = min(self.stopped_after), max(self.stopped_after)
            after = f"{low}" if low == high else f"{low}-{high}"
            text = f"{self.stopped} of {self.candidates} stopped after {after} examples, " + text
        return text

    def metrics(self) -> dict[str, float]:
        return {
            "race_stopped": float(self.stopped),
            "race_stopped_mean_examples": (sum(self.stopped_after) / self.stopped) if self.stopped else 0.0,
            "scoring_requests": float(self.requests),
            "scoring_requests_full": float(self.full_requests),
            "race_saved_fraction": self.saved_fraction,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_fraction": round(self.saved_fraction, 4)}
