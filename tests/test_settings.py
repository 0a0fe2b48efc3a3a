"""Settings: defaults, sources and their precedence, config files, validation, secrets."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from distillprompt.errors import UserError
from distillprompt.settings import METHOD_NAMES, load_settings

SECRET = "sk-test-very-secret-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DISTILLPROMPT_* or OPENAI_* variable of the machine leaks into these tests."""
    for name in list(os.environ):
        if name.startswith(("DISTILLPROMPT_", "OPENAI_")):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def settings_error(**kwargs) -> str:
    with pytest.raises(UserError) as raised:
        load_settings(**kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


# ----- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings()
    assert s.optimizer.rounds == 5
    assert s.optimizer.rewrites == 4
    assert s.optimizer.distill_examples == 5
    assert s.optimizer.paraphrases == 3
    assert s.optimizer.temperature_rewrite == 0.7
    assert s.optimizer.temperature_distill == 0.5
    assert s.optimizer.temperature_compress == 0.4
    assert s.optimizer.temperature_aggregate == 0.4
    assert s.optimizer.temperature_paraphrase == 0.7
    assert s.llm.concurrency == "auto" and s.llm.max_in_flight == 256
    assert s.cache.enabled is True
    assert s.seed == 0
    assert s.llm.api_key is None
    assert s.llm.base_url is None
    assert s.data.text_column == ["text"]
    assert s.data.label_column == "label"
    assert s.data.task == "classification"


def test_optimizer_model_defaults_to_target_model() -> None:
    s = load_settings({"llm": {"model": "target-7b"}})
    assert s.optimizer_model == "target-7b"
    s = load_settings({"llm": {"model": "target-7b", "optimizer_model": "writer-70b"}})
    assert s.optimizer_model == "writer-70b"
    assert s.llm.model == "target-7b"


def test_optimizer_base_url_defaults_to_base_url() -> None:
    s = load_settings({"llm": {"base_url": "http://target/v1"}})
    assert s.optimizer_base_url == "http://target/v1"
    s = load_settings({"llm": {"base_url": "http://target/v1", "optimizer_base_url": "http://writer/v1"}})
    assert s.optimizer_base_url == "http://writer/v1"


@pytest.mark.parametrize(("given", "expected"), [("a,b", ["a", "b"]), (" premise , hypothesis ", ["premise", "hypothesis"]), ("text", ["text"])])
def test_text_column_is_split_on_commas(given: str, expected: list[str]) -> None:
    assert load_settings({"data": {"text_column": given}}).data.text_column == expected


def test_text_column_must_not_be_empty() -> None:
    message = settings_error(cli_overrides={"data": {"text_column": " , "}})
    assert "text_column" in message


# ----- environment ---------------------------------------------------------------------


def test_env_model_and_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLPROMPT_LLM__MODEL", "env-model")
    monkeypatch.setenv("DISTILLPROMPT_SEED", "42")
    s = load_settings()
    assert s.llm.model == "env-model"
    assert s.seed == 42
    assert s.optimizer_model == "env-model"


def test_env_nested_numbers_and_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLPROMPT_OPTIMIZER__EPOCHS", "2")
    monkeypatch.setenv("DISTILLPROMPT_CACHE__ENABLED", "false")
    s = load_settings()
    assert s.optimizer.rounds == 2
    assert s.cache.enabled is False


def test_env_text_column_as_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLPROMPT_DATA__TEXT_COLUMN", '["premise", "hypothesis"]')
    assert load_settings().data.text_column == ["premise", "hypothesis"]


@pytest.mark.parametrize(("value", "expected"), [("premise,hypothesis", ["premise", "hypothesis"]), ("question", ["question"])])
def test_env_text_column_like_the_flag(monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]) -> None:
    monkeypatch.setenv("DISTILLPROMPT_DATA__TEXT_COLUMN", value)
    assert load_settings().data.text_column == expected


def test_openai_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai-env:8000/v1")
    s = load_settings()
    assert s.llm.api_key is not None
    assert s.llm.api_key.get_secret_value() == SECRET
    assert s.llm.base_url == "http://openai-env:8000/v1"
    assert s.optimizer_base_url == "http://openai-env:8000/v1"


def test_empty_openai_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    s = load_settings()
    assert s.llm.api_key is None and s.llm.base_url is None


# ----- precedence ----------------------------------------------------------------------

# strongest first; "defaults" sets nothing (base_url defaults to None)
SOURCES = ["cli", "distillprompt_env", "config_file", "openai_env", "defaults"]


def _apply(source: str, value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kwargs: dict) -> None:
    if source == "cli":
        kwargs["cli_overrides"] = {"llm": {"base_url": value}}
    elif source == "distillprompt_env":
        monkeypatch.setenv("DISTILLPROMPT_LLM__BASE_URL", value)
    elif source == "config_file":
        kwargs["config_file"] = write(tmp_path / "config.toml", f'[llm]\nbase_url = "{value}"\n')
    elif source == "openai_env":
        monkeypatch.setenv("OPENAI_BASE_URL", value)


@pytest.mark.parametrize(("stronger", "weaker"), list(itertools.combinations(SOURCES, 2)))
def test_precedence_pairs(stronger: str, weaker: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kwargs: dict = {}
    _apply(weaker, f"http://{weaker}/v1", monkeypatch, tmp_path, kwargs)
    _apply(stronger, f"http://{stronger}/v1", monkeypatch, tmp_path, kwargs)
    assert load_settings(**kwargs).llm.base_url == f"http://{stronger}/v1"


def test_each_source_alone_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for source in SOURCES[:-1]:
        with monkeypatch.context() as patch:
            kwargs: dict = {}
            _apply(source, f"http://{source}/v1", patch, tmp_path, kwargs)
            assert load_settings(**kwargs).llm.base_url == f"http://{source}/v1"


def test_precedence_merges_groups_field_by_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        '[llm]\nmodel = "file-model"\nbase_url = "http://file/v1"\nconcurrency = 3\n[data]\ntrain_size = 7\ntest_size = 8\n',
    )
    monkeypatch.setenv("DISTILLPROMPT_LLM__CONCURRENCY", "5")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    s = load_settings({"llm": {"model": "cli-model"}, "data": {"test_size": 9}}, config_file=config)
    assert s.llm.model == "cli-model"  # CLI
    assert s.llm.concurrency == 5  # env over file
    assert s.llm.base_url == "http://file/v1"  # file, untouched by the CLI's llm table
    assert s.data.train_size == 7  # file
    assert s.data.test_size == 9  # CLI over file
    assert s.llm.api_key.get_secret_value() == SECRET  # OPENAI_API_KEY, nothing stronger set it
    assert s.optimizer.rounds == 5  # default


def test_api_key_precedence_file_over_openai_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    config = write(tmp_path / "c.toml", '[llm]\napi_key = "sk-from-file"\n')
    assert load_settings(config_file=config).llm.api_key.get_secret_value() == "sk-from-file"
    monkeypatch.setenv("DISTILLPROMPT_LLM__API_KEY", "sk-from-distillprompt-env")
    assert load_settings(config_file=config).llm.api_key.get_secret_value() == "sk-from-distillprompt-env"


def test_seed_cli_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLPROMPT_SEED", "42")
    assert load_settings({"seed": 3}).seed == 3


# ----- config files --------------------------------------------------------------------


def test_toml_config_file(tmp_path: Path) -> None:
    config = write(
        tmp_path / "settings.toml",
        'seed = 11\n[llm]\nmodel = "toml-model"\n[data]\ntext_column = "premise,hypothesis"\ntrain_size = 12\n'
        "[optimizer]\nepochs = 2\ntemperature_rewrite = 1.1\n[cache]\nenabled = false\n",
    )
    s = load_settings(config_file=config)
    assert s.seed == 11
    assert s.llm.model == "toml-model"
    assert s.data.text_column == ["premise", "hypothesis"]
    assert s.data.train_size == 12
    assert s.optimizer.rounds == 2
    assert s.optimizer.temperature_rewrite == 1.1
    assert s.cache.enabled is False


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_file(tmp_path: Path, suffix: str) -> None:
    config = write(
        tmp_path / f"settings{suffix}",
        "seed: 12\nllm:\n  model: yaml-model\n  concurrency: 4\ndata:\n  text_column: [a, b]\noptimizer:\n  rewrites: 6\n",
    )
    s = load_settings(config_file=str(config))
    assert s.seed == 12
    assert s.llm.model == "yaml-model"
    assert s.llm.concurrency == 4
    assert s.data.text_column == ["a", "b"]
    assert s.optimizer.rewrites == 6


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    s = load_settings(config_file=write(tmp_path / "empty.yaml", ""))
    assert s.optimizer.rounds == 5


@pytest.mark.parametrize(
    ("name", "text"),
    [("bad.toml", "[llm\nmodel = "), ("bad2.toml", 'seed = "unterminated\n'), ("bad.yaml", "llm: [unclosed\n  model: x: y"), ("bad.yml", "llm:\n\tmodel: x\n")],
)
def test_malformed_config_file(tmp_path: Path, name: str, text: str) -> None:
    config = write(tmp_path / name, text)
    message = settings_error(config_file=config)
    assert "cannot be parsed" in message
    assert name in message


def test_config_file_not_a_table(tmp_path: Path) -> None:
    message = settings_error(config_file=write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert "table" in message


def test_missing_config_file(tmp_path: Path) -> None:
    message = settings_error(config_file=tmp_path / "nope.toml")
    assert "does not exist" in message and "--config" in message


def test_unsupported_config_file_type(tmp_path: Path) -> None:
    message = settings_error(config_file=write(tmp_path / "settings.ini", "[llm]\nmodel=x\n"))
    assert "'.ini'" in message


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[llm]\nmodle = "x"\n', "llm.modle"),
        ("[optimizer]\nepoch = 3\n", "optimizer.epoch"),
        ("bogus = 1\n", "bogus"),
        ("[llms]\nmodel = 'x'\n", "llms"),
    ],
)
def test_unknown_key_in_config_file(tmp_path: Path, text: str, named: str) -> None:
    message = settings_error(config_file=write(tmp_path / "c.toml", text))
    assert "unknown setting" in message
    assert named in message


def test_unknown_key_suggests_known_ones(tmp_path: Path) -> None:
    message = settings_error(config_file=write(tmp_path / "c.toml", '[llm]\nmodle = "x"\n'))
    assert "model" in message.replace("modle", "")


# ----- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"data": {"train_size": 0}}, "--train-size"),
        ({"data": {"train_size": -5}}, "--train-size"),
        ({"data": {"test_size": 0}}, "--test-size"),
        ({"optimizer": {"epochs": 0}}, "--epochs"),
        ({"optimizer": {"rewrites": -1}}, "--rewrites"),
        ({"optimizer": {"distill_examples": 0}}, "--distill-examples"),
        ({"optimizer": {"paraphrases": 0}}, "--paraphrases"),
        ({"llm": {"concurrency": 0}}, "--concurrency"),
        ({"optimizer": {"temperature_rewrite": 2.5}}, "--temperature-rewrite"),
    ],
)
def test_bad_sizes_name_the_flag(overrides: dict, flag: str) -> None:
    message = settings_error(cli_overrides=overrides)
    assert flag in message


def test_bad_size_from_env_names_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLPROMPT_DATA__TRAIN_SIZE", "0")
    message = settings_error()
    assert "--train-size" in message
    assert "DISTILLPROMPT_DATA__TRAIN_SIZE" in message


def test_bad_size_from_config_file(tmp_path: Path) -> None:
    message = settings_error(config_file=write(tmp_path / "c.toml", "[optimizer]\nepochs = -2\n"))
    assert "--epochs" in message


# ----- secrets -------------------------------------------------------------------------


def test_api_key_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    s = load_settings()
    assert s.llm.api_key.get_secret_value() == SECRET  # it is there...
    public = s.public_dict()
    assert "api_key" not in public
    assert SECRET not in repr(public)
    assert SECRET not in str(s)
    assert SECRET not in repr(s)
    assert SECRET not in repr(s.llm)
    assert SECRET not in str(s.llm.api_key)


def test_api_key_from_cli_never_shown() -> None:
    s = load_settings({"llm": {"api_key": SECRET, "model": "m"}})
    assert SECRET not in str(s) and SECRET not in repr(s) and SECRET not in repr(s.public_dict())
    assert s.public_dict()["model"] == "m"


def test_invalid_api_key_value_not_echoed(tmp_path: Path) -> None:
    message = settings_error(config_file=write(tmp_path / "c.toml", "[llm]\napi_key = 987654321987\n"))
    assert "api_key" in message
    assert "987654321987" not in message


def test_public_dict_uses_flag_names() -> None:
    public = load_settings({"data": {"train_size": 33}}).public_dict()
    assert public["train_size"] == 33
    assert public["cache"] is True  # the --cache flag
    assert public["rounds"] == 5


def test_every_method_the_settings_accept_is_installed_and_compare_offers_them() -> None:
    """--method and compare's --methods take the one list of names; each is a method that runs."""
    from distillprompt.methods import method_for
    from mlflow_project.compare import parse_methods

    assert [method_for(name).name for name in METHOD_NAMES] == list(METHOD_NAMES)
    assert parse_methods(",".join(METHOD_NAMES)) == list(METHOD_NAMES)
    with pytest.raises(UserError, match="unknown method nothing"):
        parse_methods("distillprompt,nothing")
