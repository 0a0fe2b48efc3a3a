"""The groups of the settings tree (``llm``, ``data``, ``optimizer``, ``cache``, ``mlflow``): every
setting, its default, its checks and the help text of its CLI flag. ``settings.py`` puts them
together and says where their values come from.

Every model here is frozen: a run's settings are resolved once (``resolution.py``) and never
changed afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

DEFAULT_CACHE_PATH = Path("~/.cache/distillprompt/cache.sqlite")


def flag(name: str) -> dict[str, Any]:
    """Marks a field whose CLI flag is not simply ``--field-name`` (marks combine with ``|``)."""
    return {"flag": name}


# How a run is carried out (where, how fast, what it may spend, where it is recorded), not
# what it finds: --resume takes it as given again; any other setting keeps the run's value.
OPERATIONAL: dict[str, Any] = {"operational": True}
# A URL, which may carry credentials: shown and recorded masked (``urls.masked``).
URL: dict[str, Any] = {"url": True}


def alias(former: str) -> dict[str, Any]:
    """A field's former name, still accepted everywhere the field is set: ``--former``
    (CLI), ``…__FORMER`` (environment), ``former`` (config file, keyword arguments)."""
    return {"validation_alias": former, "json_schema_extra": {"alias": former}}


class Group(BaseModel):
    # by name, and by a former name where a field has one (``alias``); never changed once made
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


AUTO_START_CONCURRENCY = 16


class LLMSettings(Group):
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (also read from OPENAI_BASE_URL; "
        "none: the embedded local model)",
        json_schema_extra=URL | OPERATIONAL,
    )
    backend: Literal["auto", "local", "endpoint"] = Field(
        "auto",
        description="auto: the endpoint at --base-url, else the embedded model; local: always the embedded model",
        json_schema_extra=flag("--llm"),
    )
    local_model: Path | None = Field(
        None, description="GGUF file for the embedded llama.cpp server (default: the bundled SmolLM2-135M-Instruct)"
    )
    local_threads: int = Field(0, ge=0, description="threads of the embedded server (0: every core this process may use)",
                               json_schema_extra=OPERATIONAL)
    local_context: int = Field(4096, ge=512, description="context size of the embedded server, in tokens")
    api_key: SecretStr | None = Field(
        None, description="API key of the endpoint; prefer the OPENAI_API_KEY variable to the flag",
        json_schema_extra=OPERATIONAL,
    )
    model: str = Field("gpt-4o-mini", description="target model: the one whose prompt is optimized and scored")
    optimizer_model: str | None = Field(
        None, description="model that writes candidate prompts (default: the target model)"
    )
    optimizer_base_url: str | None = Field(
        None, description="endpoint of the optimizer model (default: --base-url)",
        json_schema_extra=URL | OPERATIONAL,
    )
    concurrency: int | str = Field(
        "auto",
        description="LLM requests in flight at once, over the whole run: a number, or auto (start at 16, grow while "
        "replies come as fast and no 429 arrives, back off on 429s, Retry-After and slower replies; up to "
        "--max-concurrency; the embedded model gets 16)",
        json_schema_extra=OPERATIONAL,
    )
    max_concurrency: int = Field(256, gt=0, description="the most requests in flight that --concurrency auto may reach",
                                 json_schema_extra=OPERATIONAL)
    rpm: float | None = Field(
        None, gt=0, description="requests per minute the endpoint allows (the run stays under it, over all Ray actors)",
        json_schema_extra=OPERATIONAL,
    )
    tpm: float | None = Field(
        None,
        gt=0,
        description="tokens per minute the endpoint allows, counted as providers do before answering: input "
        "characters / 4 + max_tokens",
        json_schema_extra=OPERATIONAL,
    )
    timeout: float = Field(120.0, gt=0, description="seconds before one request is abandoned and retried",
                           json_schema_extra=OPERATIONAL)
    max_retries: int = Field(8, ge=0, description="retries of a request after 429, 5xx, timeouts or lost connections",
                             json_schema_extra=OPERATIONAL)
    backoff_base: float = Field(0.5, ge=0, description="first retry delay in seconds; doubles on each retry, with jitter",
                                json_schema_extra=OPERATIONAL)
    backoff_max: float = Field(30.0, ge=0, description="longest delay between two retries, in seconds",
                               json_schema_extra=OPERATIONAL)
    n_mode: Literal["auto", "native", "separate"] = Field(
        "auto",
        description="how several samples of one meta-prompt are asked for: one call with n (native), "
        "n calls (separate), or native with a fallback when the endpoint returns fewer (auto)",
    )
    price_input: float = Field(0.0, ge=0, description="USD per 1M input tokens, for the cost report",
                               json_schema_extra=OPERATIONAL)
    price_output: float = Field(0.0, ge=0, description="USD per 1M output tokens, for the cost report",
                                json_schema_extra=OPERATIONAL)
    meta_max_tokens: int = Field(1024, gt=0, description="max_tokens of a meta-prompt reply (a new candidate)")
    answer_max_tokens: int | None = Field(
        None,
        gt=0,
        description="max_tokens of a scoring answer (default: 256 on an endpoint, room for a short reasoning "
        "before the tagged answer; on the embedded model the longest label + 16 for classification)",
    )
    context_tokens: int | None = Field(
        None,
        gt=0,
        description="context window of the target model in tokens, when you know it: the data check drops (and "
        "counts) rows whose input alone is longer, estimated at 4 characters a token (default: unknown, and such "
        "rows are refused by the endpoint and counted as wrong answers; the embedded model's is --local-context)",
    )
    reasoning_tokens: int = Field(
        8192,
        ge=0,
        description="room for a reasoning model's hidden reasoning: once the endpoint asks for max_completion_tokens "
        "instead of max_tokens (OpenAI's o-series and gpt-5 family), every request's token limit is its answer or "
        "meta budget plus this many tokens (a ceiling: only the tokens the model uses are paid)",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number <= 0 or str(number) != str(value).strip():
            raise ValueError("give a whole number of requests above 0, or auto")
        return number

    @property
    def adaptive(self) -> bool:
        return self.concurrency == "auto"

    @property
    def known_context(self) -> int | None:
        """The target model's context in tokens, if known: set, or the embedded server's."""
        return self.context_tokens or (self.local_context if self.backend == "local" else None)

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight this run may have: the fixed bound, or auto's ceiling."""
        return self.max_concurrency if self.concurrency == "auto" else int(self.concurrency)


class DataSettings(Group):
    dataset: str | None = Field(
        None,
        description="Hugging Face hub id, a CSV/JSON/JSONL/Parquet file, or a folder of train.*/validation.*/test.* files",
    )
    dataset_config: str | None = Field(None, description="configuration name of a hub dataset")
    train_split: str | None = Field(None, description="split the train sample comes from (default: train)")
    test_split: str | None = Field(
        None, description="split the test sample comes from (default: test, else validation, else held out of train)"
    )
    text_column: Annotated[list[str], NoDecode] = Field(
        ["text"], description="input column(s); comma-separated for pair tasks, e.g. premise,hypothesis"
    )
    label_column: str = Field("label", description="column with the label (classification) or reference answer")
    label_names: Annotated[list[str], NoDecode] | None = Field(
        None,
        description="names the model sees for the labels: one per label in their order (ClassLabel order, else "
        "sorted, numbers by value), e.g. negative,positive for 0 and 1; or old=new pairs",
    )
    task: Literal["classification", "generation"] = Field("classification", description="task type")
    generation_metric: Literal["meteor", "rouge_l", "exact_match", "numeric"] = Field(
        "meteor", description="metric of generation tasks (numeric: exact match on the final number)"
    )
    train_size: int = Field(100, gt=0, description="examples in the train sample (prompts are selected on it)")
    test_size: int = Field(200, gt=0, description="examples in the held-out test sample")
    val_size: int = Field(
        0,
        ge=0,
        description="examples in a validation sample, disjoint from train and test, on which each round's best "
        "candidates by train score are compared (0: select on train only, as the paper does)",
    )

    @field_validator("text_column", "label_names", mode="before")
    @classmethod
    def _split_columns(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("write the list as JSON, e.g. [\"premise\", \"hypothesis\"], or comma-separated") from None
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("text_column")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one input column")
        return value


# The methods --method names, the one list of them: built in (``methods.METHODS``) or plugins
# (entry points ``distillprompt.methods``: MLflow's optimizers, ``mlflow_project``).
MethodName = Literal["distillprompt", "grips", "fewshot", "initial", "mlflow-gepa", "mlflow-metaprompt"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)


class OptimizerSettings(Group):
    method: MethodName = Field(
        "distillprompt",
        description="distillprompt; grips (edit search, Prasad et al. 2022); fewshot (initial prompt + train "
        "examples); initial (no optimization); mlflow-gepa, mlflow-metaprompt (MLflow's optimizers through "
        "mlflow.genai.optimize_prompts, on the same endpoint and cache)",
    )
    initial_prompt: str | None = Field(
        None, description="starting instruction (default: a one-sentence instruction built from the task)"
    )
    paper: bool = Field(
        False,
        description="DistillPrompt as the paper runs it: --demos 0 --distill-from random --scoring full, for each "
        "of these not set otherwise",
    )
    rounds: int = Field(5, gt=0, description="rounds of rewrite, distill, compress, aggregate, paraphrase "
                        "(also --epochs)", **alias("epochs"))
    rewrites: int = Field(4, gt=0, description="rewrites of the best prompt per round")
    distill_examples: int = Field(5, gt=0, description="train examples shown to each distillation")
    distill_from: Literal["errors", "random"] = Field(
        "errors",
        description="which train examples a distillation studies: errors (mostly those its source prompt got wrong, "
        "each with the target model's answer beside the correct one, and some it got right, covering the labels; "
        "from scores already paid for) or random (random examples with their answers, as the paper does)",
    )
    demos: int = Field(
        3, ge=0,
        description="solved examples a demos candidate adds to the best instruction, stratified by label and drawn "
        "from train-split rows outside the train, validation and test samples (0: no demos candidates, as the paper)",
    )
    demo_draws: int = Field(2, gt=0, description="demos candidates per round: different draws of --demos examples")
    paraphrases: int = Field(3, gt=0, description="paraphrases of the aggregated prompt per round")
    temperature_rewrite: float = Field(0.7, ge=0, le=2)
    temperature_distill: float = Field(0.5, ge=0, le=2)
    temperature_compress: float = Field(0.4, ge=0, le=2)
    temperature_aggregate: float = Field(0.4, ge=0, le=2)
    temperature_paraphrase: float = Field(0.7, ge=0, le=2)
    patience: int = Field(0, ge=0, description="stop after this many rounds without improvement (0: never)")
    scoring: Literal["race", "full"] = Field(
        "race",
        description="how a new candidate's train score is paid for: race (block by block against the best prompt "
        "so far, stopped once a paired test says it is worse; survivors are scored on the whole train sample) or "
        "full (every candidate on the whole train sample, as the paper does)",
    )
    race_block: int = Field(5, gt=0, description="race: train examples per block; the test runs after each block")
    race_alpha: float = Field(0.1, gt=0, lt=1, description="race: level of the one-sided paired permutation test "
                              "of macro-F1 that stops a candidate as worse than the best prompt")
    max_scoring_calls: int = Field(
        0, ge=0, description="budget: scoring requests (train and validation) the search may spend; a method that "
        "can size its rounds (grips) stops before a candidate would pass it; compare --budget-match sets it (0: none)",
        json_schema_extra=OPERATIONAL,
    )
    max_calls: int = Field(0, ge=0, description="budget: stop after the stage that reaches this many LLM requests (0: none)",
                           json_schema_extra=OPERATIONAL)
    max_total_tokens: int = Field(
        0, ge=0, description="budget: stop after the stage that reaches this many tokens in+out (0: none)",
        json_schema_extra=OPERATIONAL,
    )
    max_cost: float | None = Field(
        None, gt=0,
        description="budget in USD: a round stops at the end of a stage when the next would not fit, and no new "
        "request goes out once the run's calls (the cache's included) cost this much, less the test scoring's "
        "estimated cost, held back for the end; the best prompt so far is kept; stop reason max_cost (needs "
        "--price-input and --price-output; in compare, each run's own)",
        json_schema_extra=OPERATIONAL,
    )
    prefer_shorter: bool = Field(
        False, description="pick the shortest prompt among those within one example's worth of the best score the run "
        "has seen (train examples; validation examples when there is a validation sample)"
    )
    max_prompt_tokens: int = Field(
        0, ge=0, description="drop a candidate prompt longer than this many tokens, estimated at 4 characters a "
        "token (rejection reason too_many_tokens; 0: none); DistillPrompt's candidates, the solved examples they "
        "carry included (GrIPS' edits and few-shot prompts are built from the initial prompt and are not dropped)"
    )
    fewshot_examples: int = Field(3, gt=0, description="fewshot: train examples added to the initial prompt")
    grips_candidates: int = Field(5, gt=0, description="grips: candidates per iteration")
    grips_edits: int = Field(1, gt=0, description="grips: edits composed per candidate")
    grips_iterations: int = Field(10, gt=0, description="grips: most iterations")
    grips_patience: int = Field(2, ge=0, description="grips: stop after this many iterations without improvement")
    max_prompt_length: int = Field(
        0,
        ge=0,
        description="drop a candidate prompt longer than this many characters (0: 3 per token of "
        "--meta-max-tokens, beyond any real structured prompt; runaway replies are caught as repetition)",
    )
    stop_when_flat: bool = Field(
        True,
        description="stop after the second round in a row that shows no signal (candidates that score alike, "
        "or a target that gives one answer to everything)",
    )
    copy_retries: int = Field(
        1, ge=0, description="a stage reply that repeats its parent is asked again this many times (0: never)"
    )
    copy_retry_temperature: float = Field(1.0, ge=0, le=2, description="temperature of a copy's second request")
    val_top: int = Field(
        3, gt=0, description="with a validation sample: the round's best candidates by train score compared on it"
    )

    @model_validator(mode="after")
    def _paper_settings(self) -> OptimizerSettings:
        """``--paper``: the paper's value of each setting in ``PAPER_SETTINGS`` that no flag,
        variable or config key set (written while the model is made: it is frozen once made)."""
        if self.paper:
            for name, value in PAPER_SETTINGS.items():
                if name not in self.model_fields_set:
                    self.__dict__[name] = value
        return self


# What --paper sets: the method as arXiv 2508.18992 describes it (no examples in the prompt,
# random examples for distillation, every candidate scored on the whole train sample).
PAPER_SETTINGS: dict[str, Any] = {"demos": 0, "distill_from": "random", "scoring": "full"}


class CacheSettings(Group):
    enabled: bool = Field(True, description="reuse earlier LLM replies from the response cache",
                          json_schema_extra=flag("--cache") | OPERATIONAL)
    path: Path = Field(DEFAULT_CACHE_PATH, description="response cache file (sqlite)",
                       json_schema_extra=flag("--cache-path") | OPERATIONAL)


class TrackingSettings(Group):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server or store, e.g. sqlite:///mlflow.db (default: MLFLOW_TRACKING_URI; "
        "runs are tracked when either is set, or inside `mlflow run`)",
        json_schema_extra=URL | OPERATIONAL,
    )
    experiment: str = Field("distillprompt", description="MLflow experiment of runs started here")
    run_name: str | None = Field(None, description="name of the MLflow run (default: dataset and date)")
    prompt_name: str | None = Field(
        None, description="registry name of the final prompt and its model (default: derived from the dataset)",
        json_schema_extra=OPERATIONAL,
    )
    register_result: bool = Field(
        True, description="register the final prompt and a model applying it",
        json_schema_extra=flag("--register") | OPERATIONAL
    )
    trace: bool = Field(False, description="record every LLM call as an MLflow trace", json_schema_extra=OPERATIONAL)
    tracking_wait: float = Field(
        20.0, ge=0,
        description="seconds the end of a run waits for a tracking server that stopped answering to come back; "
        "then the record is left incomplete, with the command that completes it (exit 3)",
        json_schema_extra=OPERATIONAL,
    )
