"""The optimizer model's side of a round: meta-prompts out, candidate prompts back."""

from __future__ import annotations

from typing import Any

from .. import templates
from ..candidates import Extraction, extract_candidate
from ..llm import LLM, META

META_CHARS_PER_TOKEN = 3  # the default length bound: a reply that long ran into --meta-max-tokens


class MetaWriter:
    """Asks the optimizer model through the run's LLM client (its cache, retries, limiter and
    usage meter) and cleans each reply into a candidate prompt or a reason to drop it."""

    def __init__(self, llm: LLM, max_tokens: int, max_prompt_length: int = 0) -> None:
        self.llm = llm
        self.max_tokens = max_tokens
        # characters beyond which a candidate is dropped: set, or sized from the reply budget
        self.max_prompt_length = max_prompt_length or META_CHARS_PER_TOKEN * max_tokens

    @property
    def model(self) -> str:
        """The optimizer model's name at its endpoint."""
        return self.llm.model

    async def ask(
        self, meta: templates.MetaPrompt, temperature: float, n: int, salt: str, stage: str | None = None
    ) -> list[str]:
        """``n`` raw replies to a meta-prompt; ``salt`` tells this request apart from the
        round's others in the response cache, ``stage`` names it in usage (default: the
        meta-prompt's own)."""
        return await self.llm.complete(
            meta.messages, temperature=temperature, n=n, max_tokens=self.max_tokens, stage=stage or meta.stage,
            salt=salt, priority=META, stop=templates.META_STOP,
        )

    def extract(self, reply: str, meta: templates.MetaPrompt) -> Extraction:
        return extract_candidate(reply, meta, self.max_prompt_length)

    async def chat(self, messages: list[dict[str, Any]], temperature: float, salt: str, stage: str) -> str:
        """One raw reply to any messages (an outside optimizer's own meta-prompts)."""
        replies = await self.llm.complete(
            messages, temperature=temperature, n=1, max_tokens=self.max_tokens, stage=stage, salt=salt, priority=META,
        )
        return replies[0] if replies else ""
