"""The engine: the loop every method runs in (``Optimizer``), what a method sees of a round
(``Round``), the policies a run is made of (``Method``, ``Selection``, ``StopRule``), and the
typed events and results that ``Callback``s hear."""

from .events import (
    ENDPOINT_UNAVAILABLE, FLAT_SIGNAL, MAX_COST, ROUNDS_DONE, TEST_SCORING, TRAIN_SCORING, VAL_SCORING, Callback, Events,
    RoundResult, RoundSummary, RunRecords, RunResult, StageEvent, notify,
)
from .loop import Optimizer
from .policies import FlatSignal, HighestScore, LatestCandidate, Method, Patience, Selection, StopRule
from .racing import RaceSummary
from .round import Round

__all__ = [
    "ENDPOINT_UNAVAILABLE", "FLAT_SIGNAL", "MAX_COST", "ROUNDS_DONE", "TEST_SCORING", "TRAIN_SCORING", "VAL_SCORING", "Callback",
    "Events", "RoundResult", "RoundSummary", "RunRecords", "RunResult", "StageEvent", "notify", "Optimizer", "FlatSignal",
    "HighestScore", "LatestCandidate", "Method", "Patience", "Selection", "StopRule", "RaceSummary", "Round",
]
