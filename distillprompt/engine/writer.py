"""The optimizer model's side of a round: meta-prompts out, candidate prompts back."""

from __future__ import annotations

import asyncio
from typing import Any

from .. import templates
from ..candidates import Extraction, extract_candidate
from ..llm import CONTEXT_LENGTH, LLM, META, RequestRefused
from ..state import dedup_key

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

    async def candidates(
        self, meta: templates.MetaPrompt, temperature: float, n: int, salt: str, parents: list[str],
        copy_retries: int = 0, copy_temperature: float = 1.0,
    ) -> list[Extraction]:
        """``n`` replies, each cleaned into a candidate prompt or a reason to drop it. A reply
        that repeats one of the ``parents`` (prompts) is asked again at ``copy_temperature``
        (``copy_retries`` times at most, each a request of its own, counted as
        ``<stage>_copy_retry``); a retry that is unusable or refused keeps the copy.

        A meta-prompt the endpoint refuses as too long for the model's context is asked again
        with one example fewer (its longest) while it shows any (``MetaPrompt.fewer``: the
        distill stage); one refused otherwise (or for its content) gives ``n`` replies dropped
        with the refusal's reason (``context_length``, ``content_filter``)."""
        while True:
            try:
                replies = await self.ask(meta, temperature, n, salt)
                break
            except RequestRefused as refusal:
                if refusal.reason == CONTEXT_LENGTH and meta.fewer is not None:
                    meta = meta.fewer()
                    continue
                return [Extraction(None, refusal.reason) for _ in range(n)]
        extractions = [self.extract(reply, meta) for reply in replies]
        parent_keys = {dedup_key(parent) for parent in parents}
        for attempt in range(copy_retries):
            copies = [i for i, extraction in enumerate(extractions)
                      if extraction.prompt is not None and dedup_key(extraction.prompt) in parent_keys]
            if not copies:
                break
            retried = await asyncio.gather(*(
                self.ask(meta, copy_temperature, 1, f"{salt}:copy{i}:{attempt}", stage=f"{meta.stage}_copy_retry")
                for i in copies
            ), return_exceptions=True)
            for i, again in zip(copies, retried):
                if isinstance(again, BaseException) and not isinstance(again, RequestRefused):
                    raise again
                extraction = self.extract(again[0] if isinstance(again, list) and again else "", meta)
                if extraction.prompt is not None:
                    extractions[i] = extraction
        return extractions

    async def chat(self, messages: list[dict[str, Any]], temperature: float, salt: str, stage: str) -> str:
        """One raw reply to any messages (an outside optimizer's own meta-prompts)."""
        replies = await self.llm.complete(
            messages, temperature=temperature, n=1, max_tokens=self.max_tokens, stage=stage, salt=salt, priority=META,
        )
        return replies[0] if replies else ""
