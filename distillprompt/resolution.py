"""One resolution of a run's settings.

What the user gave (flags, environment, config file: ``settings.load_settings``), a resumed
run's record, the demo's defaults, local paths made absolute and the embedded endpoint's
address become the one final ``Settings`` that the whole run reads (frozen: nothing changes
it afterwards; callbacks, executors and the registry read that one), with the embedded server
it points at (started by the run) and the checkpoint a resumed run goes on from: a
``RunPlan``. Every front door resolves once, before anything uses the settings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .cost import require_prices
from .errors import UserError
from .local_llm import LocalServer, bundled_model, custom_model
from .output import recorded_in
from .settings import AUTO_START_CONCURRENCY, Settings, SettingSpec, load_settings, setting_specs
from .state import RecordedRun, RunState
from .urls import MASK

RESUME_SOURCES = "distillprompt.resume_sources"  # where a run to resume (--resume RUN_ID) is found: MLflow

DEMO_DATASET = Path(__file__).resolve().parent / "demo"
# Sized so that the whole demo (embedded 135M model, 2 cores) ends within 5 minutes with an
# empty response cache: 2 rounds of 11 candidates (2 draws of solved examples from the 50
# train reviews outside the sample, 2 rewrites, each distilled and compressed, one aggregate,
# 2 paraphrases) raced on 100 of the 150 train reviews, then 30 test reviews (4 min 44 s with
# a benchmark busy on both cores beside it, README).
DEMO_SIZES = {
    "data": {"train_size": 100, "test_size": 30},
    "optimizer": {"rounds": 2, "rewrites": 2, "paraphrases": 2},
}
# the 135M model writes prompts of 20 to 100 tokens; what runs on past this cap is rambling
# that costs seconds a reply on 2 cores (and is dropped as too long)
EMBEDDED_META_MAX_TOKENS = 256


@dataclass(frozen=True)
class RunPlan:
    """A run's final settings, the embedded server they point at (not started yet: the run
    starts and stops it) and the checkpoint a resumed run goes on from."""

    settings: Settings
    server: LocalServer | None = None
    state: RunState | None = None


def resolve(given: Settings, recorded: RecordedRun | None = None, *, loads_task: bool = True) -> RunPlan:
    """The run's final settings from the given ones and, with ``--resume``, the run's record.
    ``loads_task=False``: the caller brings its own task (``optimize_task``), so no dataset
    means no demo."""
    settings = given if recorded is None else resumed_settings(given, recorded)
    if loads_task:
        settings = with_demo_defaults(settings)
    settings = anchored(settings)
    require_prices(settings)
    server = embedded_server(settings)
    if server is not None:
        settings = served_by(settings, server)
    return RunPlan(settings, server, recorded.state if recorded is not None else None)


def recorded_run(given: Settings) -> RecordedRun:
    """The run ``--resume`` names: an output folder (``output.recorded_in``), or an MLflow run
    id, found by the resume source installed (``distillprompt.resume_sources``)."""
    folder = Path(str(given.resume)).expanduser()
    if folder.is_dir():
        return recorded_in(folder.resolve())
    for entry in entry_points(group=RESUME_SOURCES):
        return entry.load()(given)
    raise UserError(f"--resume {given.resume} is no folder, and an MLflow run id needs the MLflow integration: "
                    "reinstall the package (pip install -e .)")


def with_demo_defaults(settings: Settings) -> Settings:
    """No dataset (or ``--dataset demo``) means the bundled demo task, with the demo's sizes
    for every size the user did not set."""
    if settings.data.dataset not in (None, "", "demo"):
        return settings
    changes: dict[str, dict[str, Any]] = {"data": {"dataset": str(DEMO_DATASET)}}
    for group, sizes in DEMO_SIZES.items():
        unset = getattr(settings, group).model_fields_set
        changes.setdefault(group, {}).update({name: value for name, value in sizes.items() if name not in unset})
    return settings.with_changes(**changes)


def anchored(settings: Settings) -> Settings:
    """Local paths made absolute, so that nothing that changes the working directory later
    (ray.init inside a Ray Job does) moves them."""
    dataset = Path(settings.data.dataset).expanduser() if settings.data.dataset else None
    data = {"dataset": str(dataset.resolve())} if dataset is not None and dataset.exists() else {}
    return settings.with_changes(data=data, cache={"path": Path(settings.cache.path).expanduser().resolve()})


def embedded_server(settings: Settings) -> LocalServer | None:
    """The embedded llama.cpp server the settings ask for (not started), or None."""
    if not settings.uses_local_llm:
        return None
    model = custom_model(settings.llm.local_model) if settings.llm.local_model else bundled_model()
    return LocalServer(model, threads=settings.llm.local_threads, context=settings.llm.local_context)


def served_by(settings: Settings, server: LocalServer) -> Settings:
    """The settings pointing at the embedded server: it serves both roles, unless the
    optimizer has an endpoint of its own."""
    llm: dict[str, Any] = {"backend": "local", "base_url": server.base_url, "model": server.model.alias}
    if settings.llm.concurrency == "auto":
        # the embedded server answers from a queue and never says 429: a fixed bound
        llm["concurrency"] = AUTO_START_CONCURRENCY
    if not settings.llm.optimizer_base_url:
        llm["optimizer_model"] = None
        if "meta_max_tokens" not in settings.llm.model_fields_set:
            llm["meta_max_tokens"] = EMBEDDED_META_MAX_TOKENS
    return settings.with_changes(llm=llm)


def resumed_settings(given: Settings, recorded: RecordedRun) -> Settings:
    """The settings a resumed run goes on with. The run's recorded settings hold, so that it
    goes on as it started. A setting marked ``OPERATIONAL`` in the settings tree (the key, the
    endpoints' addresses, budgets, tracking, output, concurrency, executor, cache…) changes
    how the run is carried out, not what it finds: given again (a flag, a variable or the
    config file), it takes the place of the recorded value, and the key, which is never
    recorded, comes from what was given. Any other setting given with another value than the
    run's would change the run: the resume is refused, in one line that names them all."""
    tree = copy.deepcopy(recorded.tree)
    if tree["llm"].get("backend") == "local":
        tree["llm"]["base_url"] = None  # the embedded server of the first run is gone; a new one starts
    # what was given, with the paths and the demo's dataset resolved as the run resolved its own
    resolved = anchored(with_demo_defaults(given)).model_dump(mode="json")
    values = given.model_dump()  # a secret as its SecretStr
    changes, masked = [], []
    for spec in setting_specs():
        if _given(given, spec):
            if spec.operational:
                _put(tree, spec, _at(values, spec))
            elif _at(resolved, spec) != _at(tree, spec, None):
                changes.append(f"{spec.flag} {_shown(_at(resolved, spec))} (the run has {_shown(_at(tree, spec, None))})")
        elif spec.url and MASK in str(_at(tree, spec, None) or ""):
            masked.append(spec.flag)
    if changes:
        raise UserError(
            f"--resume {given.resume} goes on with the settings the run recorded, and these would change it: "
            f"{'; '.join(changes)}; leave them out (flag, variable or config key), or start a new run without --resume"
        )
    if masked:
        raise UserError(
            f"run {given.resume} recorded {' and '.join(masked)} with its credentials masked: give "
            f"{' and '.join(masked)} again (or OPENAI_BASE_URL / the config file) with --resume"
        )
    return load_settings(tree).with_changes(resume=recorded.tracked_run)


def _given(settings: Settings, spec: SettingSpec) -> bool:
    """Whether a flag, a variable or the config file set it."""
    holder = getattr(settings, spec.group) if spec.group else settings
    return spec.name in holder.model_fields_set


def _at(tree: dict[str, Any], spec: SettingSpec, *default: Any) -> Any:
    holder = tree.get(spec.group, {}) if spec.group else tree
    return holder.get(spec.name, *default) if default else holder[spec.name]


def _put(tree: dict[str, Any], spec: SettingSpec, value: Any) -> None:
    (tree.setdefault(spec.group, {}) if spec.group else tree)[spec.name] = value


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
