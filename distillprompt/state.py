"""Run state: every candidate with its lineage, the best so far, the random state; save and load."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

STAGES = ("demos", "rewrite", "distill", "compress", "aggregate", "paraphrase")


@dataclass
class Candidate:
    """A prompt the optimizer produced, where it came from, and how it scored on the train sample."""

    id: int
    prompt: str
    stage: str  # "initial" or one of STAGES
    round: int  # the round that made it (0: the initial prompt)
    parents: list[int] = field(default_factory=list)
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parse_rate: float | None = None
    duplicate_of: int | None = None
    note: str | None = None  # how it was made, where the stage alone does not say (GrIPS edits)
    val_score: float | None = None  # on the validation sample, for the round's top candidates by train score
    answers: dict[str, int] = field(default_factory=dict)  # the target's answers on the train sample, counted
    examples_scored: int | None = None  # train examples its score covers (fewer when a race stopped it)
    eliminated_by: int | None = None  # the incumbent or batch leader a race found it worse than: never selected
    # A prompt with solved examples (a demos candidate, or an instruction that inherited its
    # parent's): the instruction they follow, and the train-split rows they are (Example.index)
    instruction: str | None = None
    demos: list[int] = field(default_factory=list)
    refused: int = 0  # of its train examples, those whose request the endpoint refused (too long, a content filter)

    @property
    def bare_instruction(self) -> str:
        """The prompt without its solved examples: what the meta-prompts rewrite."""
        return self.instruction if self.instruction is not None else self.prompt

    @property
    def selectable(self) -> bool:
        """Scored on the whole train sample (not stopped by a race)."""
        return self.score is not None and self.eliminated_by is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(**data)


def _candidate_from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["round"] = data.pop("epoch")
    return data


def dedup_key(prompt: str) -> str:
    """Prompts that differ only in white space are the same prompt."""
    return " ".join(prompt.split())


# Raise it when a saved state's fields change meaning or are added (an older distillprompt
# then refuses the state instead of failing on a field it does not know), and add the step
# that turns the previous version into the new one to MIGRATIONS.
STATE_SCHEMA_VERSION = 4


@dataclass
class RunState:
    """Everything a run needs to go on after its last finished round (saved as JSON with
    ``schema_version``; a state from a newer schema is refused, not misread)."""

    seed: int
    history: list[Candidate] = field(default_factory=list)
    best_id: int = 0
    round: int = 0  # the last finished round
    stale_rounds: int = 0  # rounds in a row that did not change the best prompt
    flat_rounds: int = 0  # rounds in a row that showed no signal
    rng_state: Any = None
    rejections: dict[str, dict[str, int]] = field(default_factory=dict)
    stop_reason: str | None = None
    method_state: dict[str, Any] = field(default_factory=dict)  # what a method keeps between rounds
    # the best prompt's train record (``paired.record_of``: predicted label codes, or the
    # per-example metric), for racing
    best_record: list[float] | None = None
    # the examples whose scoring request the endpoint refused (``engine.scoring.RefusedExamples``)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def rng(self) -> random.Random:
        rng = random.Random(f"{self.seed}:optimizer")
        if self.rng_state is not None:
            version, internal, gauss = self.rng_state
            rng.setstate((version, tuple(internal), gauss))
        return rng

    def keep_rng(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.rng_state = [version, list(internal), gauss]

    @property
    def best(self) -> Candidate:
        return self.history[self.best_id]

    def reject(self, stage: str, reason: str) -> None:
        by_reason = self.rejections.setdefault(stage, {})
        by_reason[reason] = by_reason.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = [candidate.to_dict() for candidate in self.history]
        return {"schema_version": STATE_SCHEMA_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """The state a checkpoint holds; one this distillprompt cannot read (a newer schema, a
        damaged file) is refused in one line, never read as something else."""
        try:
            data = dict(data)
            version = data.pop("schema_version", 1)  # states saved before the field existed are version 1
            if not isinstance(version, int) or version > STATE_SCHEMA_VERSION:
                raise UserError(
                    f"the saved run state has schema version {version}, newer than this distillprompt reads "
                    f"({STATE_SCHEMA_VERSION}): upgrade distillprompt to resume it"
                )
            for older in range(version, STATE_SCHEMA_VERSION):
                data = MIGRATIONS[older](data)
            data["history"] = [Candidate.from_dict(item) for item in data["history"]]
            return cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise UserError(
                f"the saved run state cannot be read ({reason}): it is damaged or was not written by distillprompt; "
                "start a new run (without --resume)"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> RunState:
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # refused below, as any state that is not one
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Writes atomically: a reader never sees half a checkpoint."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(target.suffix + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        os.replace(temporary, target)

    @classmethod
    def load(cls, path: str | Path) -> RunState:
        return cls.from_json(Path(path).read_text())


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 names rounds "round" (version 1 said "epoch") and a method's own state
    ``method_state`` (``extras``), and adds racing's fields, which read with their defaults
    (``best_per_example`` None: the best prompt's per-example scores are scored again, the
    response cache answering them)."""
    data = dict(data)
    data["round"] = data.pop("epoch", 0)
    data["stale_rounds"] = data.pop("stale_epochs", 0)
    data["method_state"] = data.pop("extras", {})
    data["history"] = [_candidate_from_version_1(item) for item in data["history"]]
    return data


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 races on the selection metric, so it keeps the best prompt's train record
    (its predicted labels) instead of its per-example correctness: the record reads as None
    and is scored once more, the response cache answering it. Candidates may carry solved
    examples (``instruction``, ``demos``), which read with their defaults (none)."""
    data = dict(data)
    data.pop("best_per_example", None)
    data["best_record"] = None
    return data


def _from_version_3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4 counts the requests the endpoint refused for what they hold: per candidate
    (``refused``) and per example (the state's ``refused``); an older state refused none."""
    return dict(data)


@dataclass(frozen=True)
class RecordedRun:
    """What a run leaves for ``--resume``: its settings as it recorded them
    (``Settings.recorded_tree``: secrets left out, URLs masked) and its last checkpoint (None:
    it stopped before its first round finished, and starts again, from the response cache)."""

    tree: dict[str, Any]
    state: RunState | None
    # the MLflow run the resumed run records into (None: a run resumed from its output folder,
    # which, when tracked, records into a new run)
    tracked_run: str | None = None


MIGRATIONS = {1: _from_version_1, 2: _from_version_2, 3: _from_version_3}  # version -> the step to the next one
