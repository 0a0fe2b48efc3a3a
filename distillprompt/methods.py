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
from .data import Example
from .errors import UserError
from .engine import Method, Round
from .settings import OptimizerSettings
from .state import Candidate, dedup_key


class DistillPrompt(Method):
    """Each round: rewrite the best prompt, distill each rewrite on a few train examples,
    compress each distilled prompt, aggregate the compressed ones into one, and paraphrase
    the aggregate (arXiv 2508.18992). A reply that is dropped passes its parent on: the next
    stage still gets one input per reply, so a weak optimizer model thins a round out
    instead of ending it.

    Beyond the paper (``--paper`` turns both off): a round first proposes the best
    instruction with new draws of solved examples (``--demos``, ``--demo-draws``), and a
    distillation studies mostly what its source prompt got wrong (``--distill-from errors``).
    When the best prompt carries examples, the stages rewrite its instruction and every new
    instruction keeps those examples, so that it is compared with the best on equal terms."""

    name = "distillprompt"

    async def propose(self, current: Round) -> None:
        best = current.best
        settings: OptimizerSettings = current.settings
        task = current.task
        kept = current.demos_of(best)  # the best prompt's solved examples, carried by every new instruction

        # demos: the best instruction with other solved examples, scored beside the round's stages
        if settings.demos:
            if not task.demo_pool:
                current.reject("demos", "no_spare_rows")  # every row of the train split is in a sample
            for _ in range(settings.demo_draws if task.demo_pool else 0):
                examples = current.draw_demos(settings.demos)
                if current.too_long(best.bare_instruction, examples):
                    current.reject("demos", "too_many_tokens")
                    continue
                note = "examples: train-split rows " + ", ".join(str(example.index) for example in examples)
                current.add(best.bare_instruction, "demos", [best], note=note, demos=examples)
            if await current.end_stage("demos", list(current.new)):
                return

        # rewrite: several new takes on the best prompt, told its score
        meta = templates.rewrite(task, best.bare_instruction, best.score or 0.0, task.metric)
        replies = await current.ask(meta, settings.temperature_rewrite, settings.rewrites, "rewrite", [best])
        rewrites = current.admit(replies, meta.stage, [best], kept)
        if await current.end_stage("rewrite", rewrites):
            return
        sources = [candidate or best for candidate in rewrites]

        # distill: each rewrite revised after studying a few train examples: mostly the ones
        # it got wrong (its race's answers), or random ones
        from_errors = settings.distill_from == "errors"
        if from_errors or task.shows_outputs:
            await current.scored()  # the sources' own answers go into their meta-prompts
        metas = []
        for source in sources:
            studied = current.mistakes(source, settings.distill_examples) if from_errors else None
            if studied is not None and studied.examples:
                metas.append(templates.distill(task, source.bare_instruction, studied.examples, studied.answers,
                                               mistakes=studied.summary or ""))
                continue
            # random examples (the paper), or a source with no answers in this process (a resumed best)
            examples = current.draw_examples(settings.distill_examples)
            metas.append(templates.distill(task, source.bare_instruction, examples, current.observed(source.prompt, examples)))
        distilled = await self._one_each(current, "distill", metas, sources, settings.temperature_distill, kept)
        if await current.end_stage("distill", distilled):
            return
        sources = [candidate or source for candidate, source in zip(distilled, sources)]

        # compress: each distilled prompt cut to its key ideas
        metas = [templates.compress(task, source.bare_instruction) for source in sources]
        compressed = await self._one_each(current, "compress", metas, sources, settings.temperature_compress, kept)
        if await current.end_stage("compress", compressed):
            return
        sources = [candidate or source for candidate, source in zip(compressed, sources)]

        # aggregate: one prompt that merges all compressed ones (each distinct prompt once)
        merged = list({dedup_key(s.prompt): current.original(s) for s in sources}.values())
        meta = templates.aggregate(task, [source.bare_instruction for source in merged])
        replies = await current.ask(meta, settings.temperature_aggregate, 1, "aggregate", merged)
        aggregated = current.admit(replies, meta.stage, merged, kept)
        if await current.end_stage("aggregate", aggregated):
            return
        source = aggregated[0] or merged[0]

        # paraphrase: meaning-preserving variants of the aggregate
        meta = templates.paraphrase(task, source.bare_instruction)
        replies = await current.ask(meta, settings.temperature_paraphrase, settings.paraphrases, "paraphrase", [source])
        await current.end_stage("paraphrase", current.admit(replies, meta.stage, [source], kept))

    @staticmethod
    async def _one_each(
        current: Round, stage: str, metas: list[templates.MetaPrompt], sources: list[Candidate], temperature: float,
        demos: list[Example],
    ) -> list[Candidate | None]:
        """One reply per source, asked together; each admitted with its source as parent (and
        followed by ``demos``, the best prompt's solved examples)."""
        replies = await asyncio.gather(
            *(current.ask(meta, temperature, 1, f"{stage}:{i}", [source])
              for i, (meta, source) in enumerate(zip(metas, sources)))
        )
        admitted: list[Candidate | None] = []
        for meta, source, reply in zip(metas, sources, replies):
            admitted += current.admit(reply, meta.stage, [source], demos)
        return admitted


# the built-in methods by name (settings.METHOD_NAMES lists these and the plugins)
METHODS: dict[str, type[Method]] = {method.name: method for method in (DistillPrompt, Grips, FewShot, InitialOnly)}
METHOD_PLUGINS = "distillprompt.methods"  # entry points: methods that need more than the core (MLflow's optimizers)


def method_for(name: str) -> Method:
    """A new instance of the method ``name``: built in, or a plugin (entry point)."""
    if name in METHODS:
        return METHODS[name]()
    for entry in entry_points(group=METHOD_PLUGINS):
        if entry.name == name:
            return entry.load()()
    raise UserError(f"method {name!r} is not installed: reinstall the package (pip install -e .) or pick another --method")
