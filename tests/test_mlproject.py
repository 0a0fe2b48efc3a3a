"""The MLproject is written from the settings tree: every setting is an `mlflow run`
parameter, and one left empty leaves the setting to the config file, the environment and the
default. A setting added to the tree is a flag, a variable, a config key and a parameter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from mlflow_project.mlproject import MLPROJECT, mlproject_text
from tests.conftest import ROOT, venv_env


def test_the_mlproject_is_written_from_the_settings_tree():
    assert MLPROJECT.read_text(encoding="utf-8") == mlproject_text(), (
        "run `python -m mlflow_project.mlproject` to write the MLproject again"
    )


def test_every_setting_is_a_parameter_left_empty_and_main_is_optimize():
    from distillprompt.settings import setting_specs

    entry_points = yaml.safe_load(MLPROJECT.read_text(encoding="utf-8"))["entry_points"]
    assert entry_points["main"] == entry_points["optimize"]
    for entry in ("optimize", "evaluate", "compare"):
        parameters = entry_points[entry]["parameters"]
        for spec in setting_specs():
            name = spec.flag.removeprefix("--").replace("-", "_")
            if spec.secret:
                assert name not in parameters  # the key is read from the environment only
            else:
                assert parameters[name] == {"type": "string", "default": ""}, (entry, name)
                assert f"--{name} {{{name}}}" in entry_points[entry]["command"]


# What a maintainer writes to add a boolean setting: one line in the settings tree.
NEW_SETTING = '    shiny_switch: bool = Field(False, description="a switch this test adds")\n'

# Run inside the copy: the setting's value from each source, as the CLI and `mlflow run` read it.
CHECK = textwrap.dedent(
    """
    import json, os, shlex, sys
    from pathlib import Path

    import yaml

    from distillprompt.cli import build_parser, settings_from_args
    from mlflow_project.__main__ import to_cli

    VARIABLE = "DISTILLPROMPT_CACHE__SHINY_SWITCH"
    Path("on.toml").write_text("[cache]\\nshiny_switch = true\\n")
    ENTRY = yaml.safe_load(Path("MLproject").read_text())["entry_points"]["optimize"]


    def cli(argv, variable=None):
        os.environ.pop(VARIABLE, None)
        if variable is not None:
            os.environ[VARIABLE] = variable
        return settings_from_args(build_parser().parse_args(argv)).cache.shiny_switch


    def mlflow_run(variable=None, **given):
        # as `mlflow run -P name=value` builds the command: every parameter, quoted, in the template
        values = {name: str(spec.get("default", "")) for name, spec in ENTRY["parameters"].items()}
        values.update(given)
        argv = shlex.split(ENTRY["command"].format(**{k: shlex.quote(v) for k, v in values.items()}))
        assert argv[:3] == ["python", "-m", "mlflow_project"], argv
        return cli(to_cli(argv[3:]), variable)


    print(json.dumps({
        "parameter": ENTRY["parameters"].get("shiny_switch"),
        "default": cli(["optimize"]),
        "flag": cli(["optimize", "--shiny-switch"]),
        "no_flag_over_variable": cli(["optimize", "--no-shiny-switch"], "true"),
        "variable": cli(["optimize"], "true"),
        "config_key": cli(["optimize", "--config", "on.toml"]),
        "parameter_true": mlflow_run(shiny_switch="true"),
        "parameter_false_over_variable": mlflow_run("true", shiny_switch="false"),
        "empty_parameter_leaves_the_file": mlflow_run(config="on.toml"),
        "empty_parameter_leaves_the_variable": mlflow_run("true"),
    }))
    """
)


def test_a_boolean_setting_added_in_one_place_is_a_flag_variable_config_key_and_parameter(tmp_path):
    copy = tmp_path / "project"
    for package in ("distillprompt", "mlflow_project", "ray_jobs"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    settings = copy / "distillprompt" / "setting_groups.py"
    text = settings.read_text(encoding="utf-8")
    anchor = "class CacheSettings(Group):\n"
    assert anchor in text
    settings.write_text(text.replace(anchor, anchor + NEW_SETTING), encoding="utf-8")

    env = venv_env()
    written = subprocess.run([sys.executable, "-m", "mlflow_project.mlproject"], cwd=copy, env=env,
                             capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr[-2000:]
    checked = subprocess.run([sys.executable, "-c", CHECK], cwd=copy, env=env, capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    assert found == {
        "parameter": {"type": "string", "default": ""},
        "default": False,
        "flag": True,
        "no_flag_over_variable": False,
        "variable": True,
        "config_key": True,
        "parameter_true": True,
        "parameter_false_over_variable": False,
        "empty_parameter_leaves_the_file": True,
        "empty_parameter_leaves_the_variable": True,
    }
    # the copy's tree, not this one's, answered: here the setting does not exist
    assert "shiny_switch" not in MLPROJECT.read_text(encoding="utf-8")
