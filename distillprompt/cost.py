"""What a run costs and may spend, in one place, with one price model (``llm.Prices``: a
request's input and output tokens at USD per 1M tokens; tokens the endpoint has not counted
are estimated at 4 characters each, ``llm.text_tokens``).

**The estimate** (``estimate``, ``Estimate``): what a run will send and spend, before it sends
anything (``--dry-run``, and the line every run starts with). The run's own loop runs once,
at once, against an endpoint that answers without a model (``DryRunEndpoint``): every
request the run would build (the initial prompt, the sampled examples, the meta-prompts' own
text, the answer budget) is built by the run's own code and counted, and none is sent. What
the response cache already holds is answered from it, as the real run would be (and counted
as what a rerun does not pay again); the cache is only read (``ReadOnlyCache``). The
dry-run endpoint answers a meta-prompt with a new candidate as long as the initial prompt
(every candidate distinct, so none is a duplicate), and a scoring request with an answer as
long as the task's answers (a label, or a reference of average length). Why a replay and not
a formula: docs/decisions.md.

Racing: the replay scores in full (the upper bound: no candidate stopped early), and the
expected figure takes the candidates' train scoring at the fraction of full scoring that
racing spent in ``benchmarks/selection.py`` (block 5, alpha 0.1, 24 seeds: 75% at train 20,
56% at 50, 44% at 100, 36% at 200), interpolated on the train size.

**--max-cost** (``CostCap``): the budget, less the test scoring's estimated cost (held back so
that the best prompt gets its test score), is what the search may spend; it is kept before
every call, at the end of every stage, and for a best prompt longer than the estimate's.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import templates
from .data import Task
from .errors import CostLimitReached, UserError
from .evaluation import TEST_SCORING, TRAIN_SCORING, VAL_SCORING
from .llm import ChatClient, PriorityLimiter, Prices, Reply, Usage, UsageMeter, text_tokens
from .settings import LLMSettings, Settings

SCORING_STAGES = (TRAIN_SCORING, VAL_SCORING, TEST_SCORING)
# racing's scoring requests as a fraction of full scoring's, by train size: the permutation
# test's shares in benchmarks/selection.py (8 seeds, 3 rounds), the mean of candidates
# scored independently and correlated 0.5 (docs/cost.md)
RACE_FRACTION = ((20, 0.96), (50, 0.78), (100, 0.61), (200, 0.48))


def race_fraction(train_size: int) -> float:
    """Racing's measured share of full scoring at this train size (interpolated on log size)."""
    sizes = [math.log(size) for size, _ in RACE_FRACTION]
    shares = [share for _, share in RACE_FRACTION]
    at = math.log(max(1, train_size))
    if at <= sizes[0]:
        return min(1.0, shares[0] + (sizes[0] - at) * (shares[0] - shares[1]) / (sizes[1] - sizes[0]))
    for (low, high), (share_low, share_high) in zip(zip(sizes, sizes[1:]), zip(shares, shares[1:])):
        if at <= high:
            return share_low + (at - low) / (high - low) * (share_high - share_low)
    return shares[-1]


@dataclass
class StageFigures:
    calls: int = 0
    cached: int = 0  # of them, answered by the cache already
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0  # of every call, the cache's included


@dataclass
class Estimate:
    """What the run will send and spend. ``requests``/``cost``: the figure to expect (the exact
    count with full scoring, racing's expected figure with racing); ``requests_max``/
    ``cost_max``: the upper bound (full scoring of every candidate)."""

    scoring: str
    rounds: int
    candidates: int
    meta: StageFigures
    scoring_train: StageFigures  # candidates' and the initial prompt's train scoring, in full
    scoring_other: StageFigures  # validation and test samples
    race_share: float  # of the candidates' train scoring, expected with racing (1.0 in full)
    initial_train: int  # train scoring requests of the initial prompt (never raced)
    prices: Prices
    # for the upper bound on tokens: requests that carry a candidate's prompt, the initial
    # prompt's tokens, and the most tokens a candidate may have (--max-prompt-tokens, else the
    # meta reply's budget --meta-max-tokens)
    candidate_requests: int = 0
    initial_tokens: int = 0
    longest: int = 0
    quotes: int = 1  # most candidate prompts one meta-prompt quotes (aggregate: every rewrite)
    initial_val: int = 0  # validation scoring requests of the initial prompt (when the run validates)
    answer_tokens: int = 0  # the answer budget of a scoring request (max_tokens): the longest a reply may be
    by_stage: dict[str, StageFigures] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def requests_max(self) -> int:
        return self.meta.calls + self.scoring_train.calls + self.scoring_other.calls

    @property
    def raced_train(self) -> int:
        """The candidates' train scoring requests expected (racing stops some early)."""
        return round((self.scoring_train.calls - self.initial_train) * self.race_share)

    @property
    def requests(self) -> int:
        return self.meta.calls + self.initial_train + self.raced_train + self.scoring_other.calls

    def _share(self) -> float:
        """Of the train scoring's figures, the share expected."""
        train = self.scoring_train.calls
        return (self.initial_train + self.raced_train) / train if train else 1.0

    @property
    def _longer(self) -> int:
        """Input tokens more, were every candidate as long as it may be."""
        return max(0, self.longest - self.initial_tokens) * self.candidate_requests

    @property
    def tokens_max(self) -> tuple[int, int]:
        parts = (self.meta, self.scoring_train, self.scoring_other)
        # meta replies as long as a candidate may be; the meta-prompts that quote candidates longer too
        meta_out = max(self.meta.output_tokens, self.meta.calls * self.longest)
        meta_in = self.meta.calls * max(0, self.longest - self.initial_tokens) * self.quotes
        # every answer as long as the answer budget lets it be (a model that reasons first)
        scoring_out = max(self.scoring_train.output_tokens + self.scoring_other.output_tokens,
                          (self.scoring_train.calls + self.scoring_other.calls) * self.answer_tokens)
        return sum(p.input_tokens for p in parts) + self._longer + meta_in, scoring_out + meta_out

    @property
    def tokens(self) -> tuple[int, int]:
        share = self._share()
        return (
            round(self.meta.input_tokens + self.scoring_other.input_tokens + self.scoring_train.input_tokens * share),
            round(self.meta.output_tokens + self.scoring_other.output_tokens + self.scoring_train.output_tokens * share),
        )

    @property
    def cost_max(self) -> float:
        return self.prices.cost(*self.tokens_max)

    @property
    def cost(self) -> float:
        return self.meta.cost + self.scoring_other.cost + self.scoring_train.cost * self._share()

    @property
    def initial_cost(self) -> float:
        """Scoring the initial prompt on the train and validation samples: what the search pays
        before its first candidate."""
        val = self.by_stage.get(VAL_SCORING, StageFigures())
        train = self.scoring_train
        return sum(figures.cost * calls / figures.calls
                   for figures, calls in ((train, self.initial_train), (val, self.initial_val)) if figures.calls)

    @property
    def test_cost(self) -> float:
        """The test scoring's cost: held back from --max-cost for the end."""
        stage = self.by_stage.get(TEST_SCORING)
        return stage.cost if stage else 0.0

    @property
    def cached(self) -> int:
        return sum(stage.cached for stage in self.by_stage.values())

    @property
    def cached_cost(self) -> float:
        return sum(stage.cost * stage.cached / stage.calls for stage in self.by_stage.values() if stage.calls)

    def params(self) -> dict[str, Any]:
        """The MLflow params of the estimate."""
        tokens_in, tokens_out = self.tokens
        return {
            "estimated_requests": self.requests,
            "estimated_requests_max": self.requests_max,
            "estimated_input_tokens": tokens_in,
            "estimated_output_tokens": tokens_out,
            "estimated_cost_usd": round(self.cost, 6),
            "estimated_cost_usd_max": round(self.cost_max, 6),
            "estimated_cached_calls": self.cached,
        }

    def to_dict(self) -> dict[str, Any]:
        tokens_in, tokens_out = self.tokens
        return {
            **self.params(),
            "scoring": self.scoring,
            "rounds": self.rounds,
            "candidates": self.candidates,
            "meta_requests": self.meta.calls,
            "scoring_requests_full": self.scoring_train.calls + self.scoring_other.calls,
            "scoring_requests": self.requests - self.meta.calls,
            "estimated_input_tokens_max": self.tokens_max[0],
            "estimated_output_tokens_max": self.tokens_max[1],
            "race_share": round(self.race_share, 4),
            "cached_cost_usd": round(self.cached_cost, 6),
            "by_stage": {stage: asdict(figures) for stage, figures in self.by_stage.items()},
            "notes": self.notes,
        }

    def line(self) -> str:
        """One line, for the start of a run."""
        cost = f", ${self.cost:,.4f} (at most ${self.cost_max:,.4f})" if self.prices else ""
        bound = f" (at most {self.requests_max:,})" if self.scoring == "race" else ""
        cached = f"; the cache holds {self.cached:,} of them" if self.cached else ""
        return f"estimate: {self.requests:,} requests{bound}{cost}{cached} (--dry-run shows the details)"

    def text(self) -> str:
        """The estimate as the dry run prints it."""
        prices = self.prices
        tokens_in, tokens_out = self.tokens
        max_in, max_out = self.tokens_max
        lines = [
            f"estimate: {self.rounds} round(s), {self.candidates} candidates, scoring {self.scoring}",
            f"  meta requests      {self.meta.calls:>9,}   tokens in {self.meta.input_tokens:>11,}   out {self.meta.output_tokens:>9,}",
        ]
        train, other = self.scoring_train, self.scoring_other
        if self.scoring == "race":
            lines.append(
                f"  scoring requests   {self.requests - self.meta.calls:>9,}   expected: racing's measured share "
                f"{self.race_share:.0%} of the candidates' train scoring at this train size"
            )
            lines.append(f"                     {train.calls + other.calls:>9,}   at most (every candidate scored in full)")
        else:
            lines.append(f"  scoring requests   {train.calls + other.calls:>9,}   tokens in {train.input_tokens + other.input_tokens:>11,}   "
                         f"out {train.output_tokens + other.output_tokens:>9,}")
        test = self.by_stage.get(TEST_SCORING, StageFigures())
        val = self.by_stage.get(VAL_SCORING, StageFigures())
        lines.append(f"    of which test {test.calls:,}, validation {val.calls:,}")
        lines.append(f"  total requests     {self.requests:>9,}" + (f"   (at most {self.requests_max:,})" if self.scoring == "race" else ""))
        lines.append(f"  total tokens       in {tokens_in:,}, out {tokens_out:,}   (at most in {max_in:,}, out {max_out:,})")
        if prices:
            lines.append(f"  cost               ${self.cost:,.4f}   (at most ${self.cost_max:,.4f})"
                         f"   at ${prices.input:g} / ${prices.output:g} per 1M tokens in / out")
        else:
            lines.append("  cost               not priced: give --price-input and --price-output (USD per 1M tokens)")
        if self.cached:
            lines.append(f"  response cache     holds {self.cached:,} of these calls"
                         + (f" (${self.cached_cost:,.4f})" if prices else "")
                         + ": the run answers them from the cache and does not pay them again")
        else:
            lines.append("  response cache     holds none of these calls")
        lines.append(f"  at most: every candidate scored in full and {self.longest:,} tokens long (the longest a candidate "
                     f"may be: --max-prompt-tokens, else --meta-max-tokens), every answer {self.answer_tokens:,} tokens "
                     "(the answer budget, --answer-max-tokens); --max-cost caps what is spent")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class ReadOnlyCache:
    """The response cache, read and never written (the dry-run endpoint's replies must not enter it)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def get(self, key: str) -> Any:
        return self.cache.get(key)

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        return self.cache.get_many(keys)

    def put(self, key: str, reply: Any) -> None:
        pass


class DryRunEndpoint:
    """An endpoint that answers at once, without a model: a candidate prompt for a
    meta-prompt (``meta``), an answer of the task's length for a scoring request."""

    def __init__(self, task: Task, initial_prompt: str, *, meta: bool) -> None:
        self.meta = meta
        self.initial_prompt = initial_prompt
        self.count = 0
        if task.is_classification:
            self.answers = list(task.labels)
        else:
            targets = [example.target for example in task.train] or ["an answer"]
            self.answers = ["x" * max(1, round(sum(len(t) for t in targets) / len(targets)))]

    async def post_chat(self, arguments: dict[str, Any]) -> Reply:
        content = "".join(str(message.get("content") or "") for message in arguments["messages"])
        n = int(arguments.get("n") or 1)
        texts = []
        for _ in range(n):
            self.count += 1
            if self.meta:
                texts.append(f"{templates.START}Variant {self.count}. {self.initial_prompt}{templates.END}")
            else:  # an answer that depends on the request, so that candidates score differently
                pick = int(hashlib.blake2b(content.encode(), digest_size=4).hexdigest(), 16) % len(self.answers)
                texts.append(self.answers[pick])
        output = sum(text_tokens(t) for t in texts)
        return Reply(texts, text_tokens(content), output, latency=0.0)

    async def close(self) -> None:
        return None


# the run's loop over given clients, in this process (the runner's): settings, meter,
# limiter, cache, optimizer client, target client
Replay = Callable[[Settings, UsageMeter, PriorityLimiter, Any, ChatClient, ChatClient], Any]


async def estimate(settings: Settings, task: Task, cache: Any, identity: str | None,
                   urls: tuple[str, str], replay: Replay) -> Estimate:
    """Replays the settings' loop against the dry-run endpoint (``urls``: the target's and the
    optimizer's endpoint, for the cache keys) and returns what the real run would spend."""
    optimizer = settings.optimizer
    simulated = settings.with_changes(optimizer={
        "scoring": "full",  # the upper bound; racing's expected figure is taken from it
        "max_cost": None,
        "stop_when_flat": False,  # the dry-run endpoint's answers carry no signal
        "patience": 0,
    })
    initial_prompt = (optimizer.initial_prompt or "").strip() or templates.default_initial_prompt(task)
    meter = UsageMeter()
    limiter = PriorityLimiter(1_000_000)  # nothing waits: nothing is sent
    llm = settings.llm
    common: dict[str, Any] = dict(
        api_key=None, limiter=limiter, meter=meter, cache=ReadOnlyCache(cache) if cache is not None else None,
        n_mode=llm.n_mode, seed=settings.seed, prices=prices_of(llm), max_retries=0,
    )
    target_url, meta_url = urls
    target = ChatClient(base_url=target_url, model=llm.model, cache_identity=identity,
                        transport=DryRunEndpoint(task, initial_prompt, meta=False), **common)
    meta = ChatClient(base_url=meta_url, model=settings.optimizer_model,
                      cache_identity=identity if meta_url == target_url else None,
                      transport=DryRunEndpoint(task, initial_prompt, meta=True), **common)
    loop = replay(simulated, meter, limiter, common["cache"], meta, target)
    result = await loop.run(optimizer.initial_prompt)
    return _estimate_of(settings, task, meter, loop, result, initial_prompt)


def _estimate_of(settings: Settings, task: Task, meter: UsageMeter, loop: Any, result: Any,
                 initial_prompt: str) -> Estimate:
    """The estimate from what the replay counted, stage by stage."""
    by_stage: dict[str, StageFigures] = {}
    for stage, usage in meter.snapshot().items():
        by_stage[stage] = _figures(usage)
    meta_figures, train, other = StageFigures(), StageFigures(), StageFigures()
    for stage, figures in by_stage.items():
        into = train if stage == TRAIN_SCORING else other if stage in SCORING_STAGES else meta_figures
        for name in asdict(figures):
            setattr(into, name, getattr(into, name) + getattr(figures, name))
    candidates = sum(1 for c in result.history if c.stage != "initial")
    optimizer, llm = settings.optimizer, settings.llm
    # as the loop decides it: a method whose selection races, on more train examples than a block
    racing = optimizer.scoring == "race" and loop.selection.races and len(task.train) > optimizer.race_block
    notes = [
        "tokens are estimated at 4 characters a token (no offline tokenizer for the endpoint's model)",
        f"candidates are taken as long as the initial prompt ({text_tokens(initial_prompt)} tokens); each 100 tokens "
        f"more per candidate adds about {100 * max(0, train.calls - len(task.train)):,} input tokens of train scoring",
        "a run that stops early (no signal, patience, budgets) or meets duplicate candidates sends fewer",
    ]
    initial_own = len(task.train) + len(task.val) + len(task.test)  # the initial prompt's own scoring
    return Estimate(
        candidate_requests=max(0, train.calls + other.calls - initial_own), initial_tokens=text_tokens(initial_prompt),
        longest=optimizer.max_prompt_tokens or llm.meta_max_tokens, quotes=max(1, optimizer.rewrites),
        scoring="race" if racing else "full", rounds=result.rounds[-1].round if result.rounds else 0,
        candidates=candidates, meta=meta_figures, scoring_train=train, scoring_other=other,
        race_share=race_fraction(len(task.train)) if racing else 1.0, initial_train=len(task.train),
        initial_val=len(task.val) if loop.validating else 0, answer_tokens=templates.answer_budget(task, llm),
        prices=prices_of(llm), by_stage=by_stage, notes=notes,
    )


def _figures(usage: Usage) -> StageFigures:
    """A stage's figures: the dry-run endpoint's requests, and the calls the cache answered (their
    tokens as the cache recorded them)."""
    return StageFigures(
        calls=usage.requests + usage.cache_hits,
        cached=usage.cache_hits,
        input_tokens=usage.input_tokens + usage.cached_tokens - usage.cached_output_tokens,
        output_tokens=usage.output_tokens + usage.cached_output_tokens,
        cost=usage.cost + usage.cached_cost,
    )


def prices_of(llm: LLMSettings) -> Prices:
    """The run's prices (``--price-input``, ``--price-output``)."""
    return Prices(llm.price_input, llm.price_output)


def require_prices(settings: Settings) -> None:
    """``--max-cost`` counts dollars: it needs the prices."""
    if settings.optimizer.max_cost and not prices_of(settings.llm):
        raise UserError("--max-cost needs prices: give --price-input and --price-output (USD per 1M tokens)")


class CostCap:
    """``--max-cost``. The search may spend the budget less ``test_reserve``, the test
    scoring's estimated cost, held back so that the best prompt gets its test score (the test
    scoring itself is never refused). Every call counts, the cache's at today's prices, so
    that a rerun from the cache stops where the first run stopped. Kept three ways:

    * before every call (``check``: the client asks): none goes out once the search's share
      is spent;
    * at the end of every stage (``next_stage_fits``): a round stops when the next stage, as
      costly as the costliest so far, would not fit, so that the run ends on finished stages,
      where a rerun ends too;
    * for a new best prompt (``reserve_for_best``): its test scoring carries its length, and
      what it has more than the initial prompt (the estimate's) is held back too."""

    def __init__(self, meter: UsageMeter, budget: float, prices: Prices, test_reserve: float = 0.0) -> None:
        self.meter = meter
        self.budget = budget
        self.prices = prices
        self.test_reserve = test_reserve
        self.longer_prompt_reserve = 0.0
        self._spent_at_mark = 0.0
        self._costliest_stage = 0.0

    @property
    def limit(self) -> float:
        """What the search may spend."""
        return self.budget - self.test_reserve - self.longer_prompt_reserve

    def spent(self) -> float:
        """What the search's calls cost so far (the test scoring's are not the search's)."""
        return sum(usage.all_cost for stage, usage in self.meter.by_stage.items() if stage != TEST_SCORING)

    def check(self, stage: str) -> None:
        if stage != TEST_SCORING and self.spent() >= self.limit:
            raise CostLimitReached(f"--max-cost is spent (${self.spent():.4f} of ${self.limit:.4f} for the search)")

    def round_started(self) -> None:
        """What a stage costs is counted from here."""
        self._spent_at_mark = self.spent()

    def next_stage_fits(self) -> bool:
        """At the end of a stage: whether a stage as costly as the costliest so far still fits."""
        cost = self.spent()
        self._costliest_stage = max(self._costliest_stage, cost - self._spent_at_mark)
        self._spent_at_mark = cost
        return cost + self._costliest_stage < self.limit

    def reserve_for_best(self, prompt: str, initial: str, test_examples: int) -> None:
        """The best prompt is now ``prompt``: its test scoring will carry its tokens more than
        the initial prompt's on each test example."""
        longer = max(0, text_tokens(prompt) - text_tokens(initial))
        self.longer_prompt_reserve = self.prices.cost(longer * test_examples, 0)


def cost_cap(settings: Settings, meter: UsageMeter, planned: Estimate | None) -> CostCap | None:
    """The run's ``--max-cost`` cap (None without one), with the test scoring's estimated cost
    held back; a budget that cannot pay for the test scoring, or for it and the initial
    prompt's scores, is refused before any request."""
    budget = settings.optimizer.max_cost
    if not budget:
        return None
    require_prices(settings)
    test_reserve = planned.test_cost if planned is not None else 0.0
    if test_reserve >= budget:
        raise UserError(
            f"--max-cost {budget:g} does not cover the test scoring alone (about ${test_reserve:.4f}): raise --max-cost "
            "or lower --test-size"
        )
    floor = test_reserve + (planned.initial_cost if planned is not None else 0.0)
    if floor >= budget:
        raise UserError(
            f"--max-cost {budget:g} does not cover scoring the initial prompt and the test sample (about "
            f"${floor:.4f}), before any candidate: raise --max-cost or lower --train-size"
        )
    return CostCap(meter, budget, prices_of(settings.llm), test_reserve)
