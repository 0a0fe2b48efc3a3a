"""The methods, by name (``--method``): DistillPrompt and the baselines it is compared with.

Each is a ``Method`` (``distillprompt.engine``): it proposes a round's candidates through the
``Round`` the loop gives it, and the loop does the rest. A method of one's own subclasses
``Method`` and is handed to ``Optimizer(method=...)``.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points

from . import templates
from .baselines import FewShot, Grips, InitialOnly
from .errors import UserError
from .engine import Method, Round
from .settings import OptimizerSettings
from .state import Candidate, dedup_key


class DistillPrompt(Method):
    """Each round: rewrite the best prompt, distill each rewrite on a few train examples,
    compress each distilled prompt, aggregate the compressed ones into one, and paraphrase
    the aggregate (arXiv 2508.18992). A reply that is dropped passes its parent on: the next
    stage still gets one input per reply, so a weak optimizer model thins a round out
    instead of ending it."""

    name = "distillprompt"

    async def propose(self, current: Round) -> None:
        best = current.best
        settings: OptimizerSettings = current.settings
        task = current.task
        # rewrite: several new takes on the best prompt, told its score
        meta = templates.rewrite(task, best.prompt, best.score or 0.0, task.metric)
        replies = await current.ask(meta, settings.temperature_rewrite, settings.rewrites, "rewrite", [best])
        rewrites = current.admit(replies, meta.stage, [best])
        if await current.end_stage("rewrite", rewrites):
            return
        sources = [candidate or best for candidate in rewrites]

        # distill: each rewrite revised after studying a few random train examples
        shown = [current.draw_examples(settings.distill_examples) for _ in sources]
        if task.shows_outputs:
            await current.scored()  # the sources' own answers go into their meta-prompts
        metas = [templates.distill(task, source.prompt, examples, current.observed(source.prompt, examples))
                 for source, examples in zip(sources, shown)]
        distilled = await self._one_each(current, "distill", metas, sources, settings.temperature_distill)
        if await current.end_stage("distill", distilled):
            return
        sources = [candidate or source for candidate, source in zip(distilled, sources)]

        # compress: each distilled prompt cut to its key ideas
        metas = [templates.compress(task, source.prompt) for source in sources]
        compressed = await self._one_each(current, "compress", metas, sources, settings.temperature_compress)
        if await current.end_stage("compress", compressed):
            return
        sources = [candidate or source for candidate, source in zip(compressed, sources)]

        # aggregate: one prompt that merges all compressed ones (each distinct prompt once)
        merged = list({dedup_key(s.prompt): current.original(s) for s in sources}.values())
        meta = templates.aggregate(task, [source.prompt for source in merged])
        replies = await current.ask(meta, settings.temperature_aggregate, 1, "aggregate", merged)
        aggregated = current.admit(replies, meta.stage, merged)
        if await current.end_stage("aggregate", aggregated):
            return
        source = aggregated[0] or merged[0]

        # paraphrase: meaning-preserving variants of the aggregate
        meta = templates.paraphrase(task, source.prompt)
        replies = await current.ask(meta, settings.temperature_paraphrase, settings.paraphrases, "paraphrase", [source])
        await current.end_stage("paraphrase", current.admit(replies, meta.stage, [source]))

    @staticmethod
    async def _one_each(
        current: Round, stage: str, metas: list[templates.MetaPrompt], sources: list[Candidate], temperature: float
    ) -> list[Candidate | None]:
        """One reply per source, asked together; each admitted with its source as parent."""
        replies = await asyncio.gather(
            *(current.ask(meta, temperature, 1, f"{stage}:{i}", [source])
              for i, (meta, source) in enumerate(zip(metas, sources)))
        )
        admitted: list[Candidate | None] = []
        for meta, source, reply in zip(metas, sources, replies):
            admitted += current.admit(reply, meta.stage, [source])
        return admitted


METHODS: dict[str, type[Method]] = {
    "distillprompt": DistillPrompt,
    "grips": Grips,
    "fewshot": FewShot,
    "initial": InitialOnly,
}
METHOD_PLUGINS = "distillprompt.methods"  # entry points: methods that need more than the core (MLflow's optimizers)


def method_for(name: str) -> Method:
    """A new instance of the method ``name``: built in, or a plugin (entry point)."""
    if name in METHODS:
        return METHODS[name]()
    for entry in entry_points(group=METHOD_PLUGINS):
        if entry.name == name:
            return entry.load()()
    raise UserError(f"method {name!r} is not installed: reinstall the package (pip install -e .) or pick another --method")
