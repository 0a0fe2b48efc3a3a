"""One settings tree for the whole package.

Sources, strongest first:
  1. CLI flags (only the ones the user typed),
  2. environment variables ``DISTILLPROMPT_<GROUP>__<NAME>`` (for example
     ``DISTILLPROMPT_LLM__MODEL``) and ``DISTILLPROMPT_SEED`` for top-level fields,
  3. a TOML or YAML config file (``--config``), with the same groups as tables,
  4. ``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` and ``RAY_ADDRESS``,
  5. the defaults below.

The groups and their fields are in ``setting_groups.py``; every field carries the help text of
its CLI flag, so the flags, the config file and the MLflow params all use the same names.
Settings are frozen: a run resolves them once (``resolution.py``) and nothing changes them
afterwards; ``with_changes`` makes a changed copy.
"""

from __future__ import annotations

import json
import os
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from .errors import UserError
# the groups, and the names that go with them, handed on: the package imports them from here
from .setting_groups import (
    AUTO_START_CONCURRENCY, DEFAULT_CACHE_PATH, METHOD_NAMES, OPERATIONAL, PAPER_SETTINGS, URL, CacheSettings, DataSettings,
    Group, LLMSettings, MethodName, OptimizerSettings, TrackingSettings, alias, flag,
)
from .urls import masked

ENV_PREFIX = "DISTILLPROMPT_"

_config_file_data: ContextVar[dict[str, Any]] = ContextVar("_config_file_data", default={})


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source that hands over an already parsed mapping."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


def _standard_env() -> dict[str, Any]:
    """OPENAI_API_KEY, OPENAI_BASE_URL and RAY_ADDRESS, the variables other tools use too."""
    found: dict[str, Any] = {}
    llm: dict[str, Any] = {}
    if os.environ.get("OPENAI_API_KEY"):
        llm["api_key"] = os.environ["OPENAI_API_KEY"]
    if os.environ.get("OPENAI_BASE_URL"):
        llm["base_url"] = os.environ["OPENAI_BASE_URL"]
    if llm:
        found["llm"] = llm
    if os.environ.get("RAY_ADDRESS"):
        found["ray_address"] = os.environ["RAY_ADDRESS"]
    return found


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    llm: LLMSettings = Field(default_factory=LLMSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    mlflow: TrackingSettings = Field(default_factory=TrackingSettings)
    seed: int = Field(0, description="seed of every random choice; the same seed reproduces a run")
    dry_run: bool = Field(
        False, description="load and check the data and the endpoint, print what the run would send and cost "
        "(requests, tokens, USD, what the cache holds), and send no completion request",
        json_schema_extra=OPERATIONAL,
    )
    output: Path | None = Field(
        None, description="folder for result.json (default: ./distillprompt-output/<timestamp>)",
        json_schema_extra=OPERATIONAL,
    )
    executor: Literal["ray", "local"] = Field(
        "ray", description="where scoring runs: ray (actors on a local instance or a cluster) or local (this process)",
        json_schema_extra=OPERATIONAL,
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to use, e.g. ray://head:10001 or auto (also RAY_ADDRESS; default: start a local one)",
        json_schema_extra=URL | OPERATIONAL,
    )
    ray_actors: int = Field(0, ge=0, description="scoring actors in the Ray pool (0: two per node)",
                            json_schema_extra=OPERATIONAL)
    ray_start: Literal["auto", "now"] = Field(
        "auto",
        description="when a local Ray instance starts: auto (once the driver is busy answering requests most of the "
        "time, so runs an endpoint limits never pay Ray's seconds of start-up) or now (at the start of the run); "
        "a cluster (--ray-address) is joined at the start either way",
        json_schema_extra=OPERATIONAL,
    )
    resume: str | None = Field(
        None,
        description="a run to continue from its last finished round, with its own settings: its MLflow run id, or "
        "its output folder (replies it already received come from the response cache)",
        json_schema_extra=OPERATIONAL,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _MappingSource(settings_cls, _config_file_data.get()),
            _MappingSource(settings_cls, _standard_env()),
        )

    # ----- views used by the rest of the package -------------------------------------

    @property
    def uses_local_llm(self) -> bool:
        return self.llm.backend == "local" or (self.llm.backend == "auto" and not self.llm.base_url)

    @property
    def optimizer_model(self) -> str:
        return self.llm.optimizer_model or self.llm.model

    @property
    def optimizer_base_url(self) -> str | None:
        return self.llm.optimizer_base_url or self.llm.base_url

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some values changed: a group's as a mapping (``llm={"model": "m"}``), a
        top-level one as is (``seed=1``). What it changes counts as set; these settings stay
        as they are."""
        update = {}
        for name, value in changes.items():
            current = getattr(self, name)
            update[name] = current.model_copy(update=value) if isinstance(current, Group) else value
        return self.model_copy(update=update)

    def recorded_tree(self) -> dict[str, Any]:
        """The settings as a tree, as they may be shown and recorded: secrets left out, URLs
        masked (what ``--resume`` restarts from)."""
        tree = self.model_dump(mode="json")
        for spec in setting_specs():
            holder = tree[spec.group] if spec.group else tree
            if spec.secret:
                del holder[spec.name]
            elif spec.url and holder[spec.name]:
                holder[spec.name] = masked(holder[spec.name])
        return tree

    def public_dict(self) -> dict[str, Any]:
        """Every setting as ``flag_name -> value`` (the CLI flag with underscores), as the
        recorded tree holds it."""
        tree = self.recorded_tree()
        return {spec.flag.lstrip("-").replace("-", "_"): (tree[spec.group] if spec.group else tree)[spec.name]
                for spec in setting_specs() if not spec.secret}


@dataclass(frozen=True)
class SettingSpec:
    """One leaf of the settings tree, with the CLI flag and variable that set it."""

    group: str | None
    name: str
    info: FieldInfo

    @property
    def flag(self) -> str:
        return str(self._mark("flag") or "--" + self.name.replace("_", "-"))

    @property
    def former_flag(self) -> str | None:
        """The flag of the field's former name, still accepted (``alias``)."""
        former = self._mark("alias")
        return "--" + str(former).replace("_", "-") if former else None

    @property
    def operational(self) -> bool:
        return bool(self._mark("operational"))

    @property
    def url(self) -> bool:
        return bool(self._mark("url"))

    def _mark(self, name: str) -> Any:
        extra = self.info.json_schema_extra
        return extra.get(name) if isinstance(extra, dict) else None

    @property
    def env(self) -> str:
        return ENV_PREFIX + (f"{self.group}__{self.name}" if self.group else self.name).upper()

    @property
    def secret(self) -> bool:
        return "SecretStr" in str(self.info.annotation)

    @property
    def path(self) -> tuple[str, ...]:
        return (self.group, self.name) if self.group else (self.name,)


def setting_specs() -> list[SettingSpec]:
    specs = []
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Group):
            specs.extend(SettingSpec(name, inner, inner_info) for inner, inner_info in annotation.model_fields.items())
        else:
            specs.append(SettingSpec(None, name, info))
    return specs


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parses a TOML, YAML or JSON config file into the settings tree's shape."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"config file {file} does not exist: check the path given to --config")
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {file} has an unsupported type {suffix!r}: use .toml, .yaml, .yml or .json")
    except UserError:
        raise
    except Exception as exc:  # tomllib, yaml and json each raise their own error types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"config file {file} cannot be parsed ({reason}): fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {file} must hold a table of settings, not a {type(data).__name__}")
    return data


def _how_to_set(location: list[str]) -> str:
    for spec in setting_specs():
        former = spec.former_flag
        names = [list(spec.path)] + ([[*spec.path[:-1], former.lstrip("-").replace("-", "_")]] if former else [])
        if location in names:
            flags = f"{spec.flag} (or {former})" if former else spec.flag
            return f"flag {flags}, variable {spec.env} or the config file"
    return "config file"


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ())]
    message = error.get("msg", "invalid value")
    if error.get("type") == "extra_forbidden":
        group = Settings.model_fields.get(location[0]) if len(location) > 1 else None
        known = (
            sorted(group.annotation.model_fields)  # type: ignore[union-attr]
            if group is not None
            else sorted(Settings.model_fields)
        )
        return f"unknown setting {'.'.join(location)}: remove it or use one of {', '.join(known)}"
    value = error.get("input")
    shown = "" if location and location[-1] == "api_key" else f"={value!r}"
    return f"invalid setting {'.'.join(location)}{shown}: {message}; fix the {_how_to_set(location)}"


def load_settings(cli_overrides: dict[str, Any] | None = None, config_file: str | Path | None = None) -> Settings:
    """Builds the settings tree from CLI overrides, environment, config file and defaults."""
    data = read_config_file(config_file) if config_file else {}
    token = _config_file_data.set(data)
    try:
        return Settings(**(cli_overrides or {}))
    except ValidationError as exc:
        raise UserError(_describe(exc.errors()[0])) from None
    except SettingsError as exc:  # an environment variable pydantic-settings cannot decode
        raise UserError(f"{exc}: fix the {ENV_PREFIX}… variable (lists and tables are written as JSON)") from None
    finally:
        _config_file_data.reset(token)
