"""Every candidate of a run, in creation order, with the index that finds a prompt seen before."""

from __future__ import annotations

from ..state import Candidate, RunState, dedup_key


class History:
    """The run state's candidates: records new ones (a prompt seen before, white space
    aside, is marked as a duplicate of the first) and counts dropped replies."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self._by_text: dict[str, Candidate] = {}
        for candidate in state.history:
            self._by_text.setdefault(dedup_key(candidate.prompt), candidate)

    def record(
        self, prompt: str, stage: str, number: int, parents: list[Candidate], note: str | None = None,
        instruction: str | None = None, demos: list[int] | None = None,
    ) -> Candidate:
        candidate = Candidate(
            id=len(self.state.history), prompt=prompt, stage=stage, round=number,
            parents=[parent.id for parent in parents], note=note, instruction=instruction, demos=list(demos or []),
        )
        known = self._by_text.get(dedup_key(prompt))
        if known is not None:
            candidate.duplicate_of = known.id
        else:
            self._by_text[dedup_key(prompt)] = candidate
        self.state.history.append(candidate)
        return candidate

    def original(self, candidate: Candidate) -> Candidate:
        """The first candidate with this prompt (itself unless it is a duplicate)."""
        return candidate if candidate.duplicate_of is None else self.state.history[candidate.duplicate_of]

    def reject(self, stage: str, reason: str) -> None:
        """Counts a dropped reply or candidate (reported per stage and reason)."""
        self.state.reject(stage, reason)

    def rejections_since(self, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """The drops counted since ``before`` (a copy of ``state.rejections``), by stage and reason."""
        delta: dict[str, dict[str, int]] = {}
        for stage, reasons in self.state.rejections.items():
            for reason, count in reasons.items():
                extra = count - before.get(stage, {}).get(reason, 0)
                if extra:
                    delta.setdefault(stage, {})[reason] = extra
        return delta
