"""MLproject entry points, kept thin: MLflow parameters become CLI flags, then the package runs.

    python -m mlflow_project optimize --dataset {dataset} --rounds {rounds} ...

An empty parameter means "not set" (the config file, the environment or the settings' own
default applies); whole numbers given as floats ("3.0") are passed as integers; "true" and
"false" turn a boolean setting's flag on or off (``--cache`` / ``--no-cache``). A URL with
credentials is refused: MLflow has recorded the parameter as given.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from distillprompt.cli import main as cli_main
from distillprompt.settings import SettingSpec, setting_specs
from distillprompt.urls import masked

COMMANDS = {"optimize", "evaluate", "promote", "compare"}
FLAG_FOR = {"resume_run_id": "--resume"}  # the MLproject's own name of a flag
ON_ONLY = {"--force", "--budget-match"}  # commands' flags without a --no- form: "false" leaves them out


def switches() -> set[str]:
    """The flags of the boolean settings, which have a --no- form."""
    return {flag for spec in setting_specs() if spec.info.annotation is bool
            for flag in (spec.flag, spec.former_flag) if flag}


def refuse_credentials(name: str, value: str, spec: SettingSpec) -> NoReturn:
    """A URL parameter with credentials: MLflow logged it as given before this process started."""
    run = os.environ.get("MLFLOW_RUN_ID", "RUN_ID")
    print(
        f"distillprompt: error: -P {name}={masked(value)} carries credentials, and MLflow recorded the parameter as "
        f"given in run {run}: delete that run (mlflow runs delete --run-id {run}), then give the URL by {spec.env} "
        "or the config file instead of -P", file=sys.stderr,
    )
    raise SystemExit(2)


def to_cli(argv: list[str]) -> list[str]:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m mlflow_project {{{'|'.join(sorted(COMMANDS))}}} --name value ...")
    out = [argv[0]]
    rest = argv[1:]
    on_off = switches()
    urls = {spec.flag: spec for spec in setting_specs() if spec.url}
    for index in range(0, len(rest), 2):
        flag = rest[index]
        value = rest[index + 1] if index + 1 < len(rest) else ""
        name = flag.lstrip("-").replace("-", "_")
        flag = FLAG_FOR.get(name, "--" + name.replace("_", "-"))
        if value.strip() == "":
            continue
        if flag in urls and masked(value) != value:
            refuse_credentials(name, value, urls[flag])
        if value.lower() in ("true", "false") and flag in on_off | ON_ONLY:
            if value.lower() == "true":
                out.append(flag)
            elif flag in on_off:
                out.append(flag.replace("--", "--no-", 1))
            continue
        if re.fullmatch(r"-?\d+\.0+", value):
            value = value.split(".")[0]
        out += [flag, value]
    return out


if __name__ == "__main__":
    sys.exit(cli_main(to_cli(sys.argv[1:])))
