"""MLflow tracking of a run: its life and resume (``runs``), its numbers (``metrics``), what it
leaves as artifacts (``artifacts``), per-request traces (``tracing``), and the callback that
ties them to the loop's events (``tracker``)."""

from .artifacts import CANDIDATE_ALIAS, lineage
from .metrics import final_metrics, round_metrics
from .runs import CHECKPOINT, SETTINGS_TREE, resume_point, tracking_requested
from .tracker import MlflowTracker, make_tracker

__all__ = [
    "CANDIDATE_ALIAS", "lineage", "final_metrics", "round_metrics", "CHECKPOINT", "SETTINGS_TREE", "resume_point",
    "tracking_requested", "MlflowTracker", "make_tracker",
]
