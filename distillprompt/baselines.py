"""The methods DistillPrompt is compared with, in the same harness.

Each is a ``Method`` run by the same loop (``optimizer.Optimizer``) through the public
``Round``: the LLM layer, cache, evaluator (Ray), selection (ties keep the older prompt),
callbacks (MLflow), budgets and resume are shared, so runs of any two methods compare
directly.

* ``grips`` — GrIPS (Prasad et al., 2022), as its reference code runs it: each iteration
  makes ``grips_candidates`` (5) candidates from the current best, each by composing
  ``grips_edits`` (1) random edits on phrase-level chunks (word-level when the instruction
  has fewer than three phrases): delete a chunk, swap two chunks, paraphrase a chunk, or
  add back a deleted chunk. The pool of deleted chunks holds only what the accepted
  candidates deleted, and loses a chunk when an accepted candidate adds it back; ``add``
  draws only chunks the base does not contain. A candidate replaces the best only if it
  scores higher; the search stops after ``grips_iterations`` (10) iterations or
  ``grips_patience`` (2) iterations in a row without improvement. Differences from the
  paper that remain: candidates are scored with the task's metric (macro-F1 for
  classification), as every method here, not GrIPS's entropy-weighted score; the optimizer
  LLM paraphrases a chunk instead of PEGASUS; chunks come from punctuation and
  conjunctions instead of a constituency parser.
* ``fewshot`` — the initial instruction followed by ``fewshot_examples`` (3) random
  examples of the train sample with their answers; that prompt is the result (no search).
* ``initial`` — no optimization: the reference score of the initial prompt.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import Any

from . import templates
from .candidates import extract_tagged
from .engine import LatestCandidate, Method, Round, Selection
from .settings import OptimizerSettings
from .state import Candidate

EDIT_OPERATIONS = ("delete", "swap", "paraphrase", "add")
PHRASE_BREAK = re.compile(r"(?<=[,;:.!?])\s+|\s+(?=\b(?:and|or|but|then|so)\b\s)")
DELETED = "grips_deleted"


def chunks(text: str) -> list[str]:
    """Phrase-level chunks (split after punctuation and before conjunctions), or words when
    the text has fewer than three phrases."""
    phrases = [part.strip() for part in PHRASE_BREAK.split(text.strip()) if part and part.strip()]
    return phrases if len(phrases) >= 3 else text.split()


def join(parts: list[str]) -> str:
    text = " ".join(part for part in parts if part)
    return re.sub(r"\s+([,;:.!?])", r"\1", text).strip()


@dataclass(frozen=True)
class Edit:
    operation: str
    index: int
    other: int = 0  # swap: the second position; add: which deleted chunk


def plan_edits(count: int, size: int, deleted: int, rng: Any) -> list[Edit]:
    """Draws ``count`` edits for a text of ``size`` chunks; the draws depend only on sizes,
    so a plan is fixed before any paraphrase is written."""
    plan = []
    for _ in range(count):
        allowed = [
            op
            for op in EDIT_OPERATIONS
            if (op != "add" or deleted) and (op != "swap" or size >= 2) and (op != "delete" or size >= 2)
        ]
        operation = rng.choice(allowed)
        if operation == "add":
            plan.append(Edit("add", rng.randrange(size + 1), rng.randrange(deleted)))
            size += 1
        elif operation == "swap":
            first, second = rng.sample(range(size), 2)
            plan.append(Edit("swap", first, second))
        else:
            plan.append(Edit(operation, rng.randrange(size)))
            if operation == "delete":
                size -= 1  # the chunk joins the pool only if this candidate is accepted
    return plan


class Grips(Method):
    name = "grips"

    def __init__(self) -> None:
        self._edits: dict[int, tuple[list[str], list[str]]] = {}  # candidate id -> (deleted, added back)

    def rounds(self, settings: OptimizerSettings) -> int:
        return settings.grips_iterations

    def patience(self, settings: OptimizerSettings) -> int:
        return settings.grips_patience

    def with_scoring_budget(self, settings: OptimizerSettings, budget: int, train_size: int) -> OptimizerSettings:
        """No candidate past the budget, and as many iterations as it pays for (the patience,
        which would stop the search short of it, off)."""
        # a candidate costs the train sample, or one block when a race stops it at once
        per_candidate = min(train_size, settings.race_block) if settings.scoring == "race" else train_size
        per_iteration = max(1, settings.grips_candidates * per_candidate)
        # duplicates are not rescored, so an iteration may cost less: room for twice as many
        # (the budget, not the count, ends the search)
        iterations = max(1, 2 * math.ceil(budget / per_iteration))
        return settings.model_copy(update={"max_scoring_calls": budget, "grips_iterations": iterations,
                                           "grips_patience": 0})

    async def propose(self, current: Round) -> None:
        base = current.best
        settings = current.settings
        pool: list[str] = current.method_state.setdefault(DELETED, [])
        addable = [chunk for chunk in pool if chunk not in base.prompt]  # the base's own chunks are in its text
        count = settings.grips_candidates
        left = current.scoring_left()
        if left is not None:  # a scoring budget (compare --budget-match): no candidate beyond it
            while count and current.candidate_cost(count) > left:
                count -= 1
        plans = [plan_edits(settings.grips_edits, len(chunks(base.prompt)), len(addable), current.rng) for _ in range(count)]
        edited = await asyncio.gather(*(self.apply(current, base.prompt, plan, addable, str(i)) for i, plan in enumerate(plans)))
        self._edits = {}
        for prompt, notes, removed, added in edited:
            if not prompt.strip():
                current.reject("grips", "empty")
                continue
            candidate = current.add(prompt, "grips", [base], note="; ".join(notes))
            self._edits.setdefault(candidate.id, (removed, added))
        await current.end_stage("grips", list(current.new))

    def accepted(self, current: Round, candidate: Candidate) -> None:
        """The pool follows the accepted candidate only: its deletions go in, the chunks it
        added back come out."""
        removed, added = self._edits.get(candidate.id, ([], []))
        pool: list[str] = current.method_state.setdefault(DELETED, [])
        for chunk in added:
            if chunk in pool:
                pool.remove(chunk)
        pool.extend(chunk for chunk in removed if chunk not in pool)

    async def apply(
        self, current: Round, prompt: str, plan: list[Edit], pool: list[str], key: str
    ) -> tuple[str, list[str], list[str], list[str]]:
        """Applies a plan of edits in order; returns the text, what each edit did, the chunks
        it deleted and the pool chunks it added back. ``key`` names the candidate in the
        response cache."""
        parts = chunks(prompt)
        notes: list[str] = []
        removed: list[str] = []
        added: list[str] = []
        for step, edit in enumerate(plan):
            if edit.operation == "delete":
                chunk = parts.pop(edit.index)
                removed.append(chunk)
                notes.append(f"delete {chunk!r}")
            elif edit.operation == "swap":
                parts[edit.index], parts[edit.other] = parts[edit.other], parts[edit.index]
                notes.append(f"swap {parts[edit.other]!r} <-> {parts[edit.index]!r}")
            elif edit.operation == "add":
                chunk = pool[edit.other]
                parts.insert(edit.index, chunk)
                added.append(chunk)
                notes.append(f"add {chunk!r}")
            else:
                original = parts[edit.index]
                meta = templates.paraphrase_phrase(current.task, original)
                reply = await current.ask_text(meta, current.settings.temperature_paraphrase, f"{key}:{step}")
                rewritten = " ".join(extract_tagged(reply).split())
                if rewritten and "<" not in rewritten and len(rewritten) <= 4 * len(original) + 20:
                    parts[edit.index] = rewritten
                    notes.append(f"paraphrase {original!r} -> {rewritten!r}")
                else:
                    current.reject("grips_paraphrase", "unusable")
                    notes.append(f"paraphrase {original!r} failed")
        return join(parts), notes, removed, added


class FewShot(Method):
    """Not a search: the few-shot prompt is the result, whatever its train score."""

    name = "fewshot"

    def rounds(self, settings: OptimizerSettings) -> int:
        return 1

    def selection(self, settings: OptimizerSettings) -> Selection:
        return LatestCandidate()

    def with_scoring_budget(self, settings: OptimizerSettings, budget: int, train_size: int) -> OptimizerSettings:
        return settings  # one prompt built, not searched for

    async def propose(self, current: Round) -> None:
        base = current.initial
        examples = current.draw_examples(current.settings.fewshot_examples)
        prompt = templates.with_examples(current.task, base.prompt, examples)
        note = "examples " + ", ".join(f"train row {example.index}" for example in examples)
        current.add(prompt, "fewshot", [base], note=note)
        await current.end_stage("fewshot", list(current.new))


class InitialOnly(Method):
    """No optimization: the reference score of the initial prompt."""

    name = "initial"

    def rounds(self, settings: OptimizerSettings) -> int:
        return 0

    def selection(self, settings: OptimizerSettings) -> Selection:
        return LatestCandidate()  # never asked: there are no rounds (and no validation scoring)

    def with_scoring_budget(self, settings: OptimizerSettings, budget: int, train_size: int) -> OptimizerSettings:
        return settings  # no search

    async def propose(self, current: Round) -> None:
        return None
