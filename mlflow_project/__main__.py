"""MLproject entry points, kept thin: MLflow parameters become CLI flags, then the package runs.

    python -m mlflow_project optimize --dataset {dataset} --rounds {rounds} ...

An empty parameter means "not set" (the settings' own default, environment or config file
applies); whole numbers given as floats ("3.0") are passed as integers.
"""

from __future__ import annotations

import re
import sys

from distillprompt.cli import main as cli_main

COMMANDS = {"optimize", "evaluate", "promote", "compare"}
FLAG_FOR = {"resume_run_id": "--resume"}
SWITCHES = {"--register", "--cache", "--trace", "--dry-run", "--prefer-shorter"}  # --x / --no-x flags
ON_ONLY = {"--force", "--budget-match"}  # flags without a --no- form: "false" leaves them out


def to_cli(argv: list[str]) -> list[str]:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m mlflow_project {{{'|'.join(sorted(COMMANDS))}}} --name value ...")
    out = [argv[0]]
    rest = argv[1:]
    for index in range(0, len(rest), 2):
        flag = rest[index]
        value = rest[index + 1] if index + 1 < len(rest) else ""
        name = flag.lstrip("-").replace("-", "_")
        flag = FLAG_FOR.get(name, "--" + name.replace("_", "-"))
        if value.strip() == "":
            continue
        if value.lower() in ("true", "false") and flag in SWITCHES | ON_ONLY:
            if value.lower() == "true":
                out.append(flag)
            elif flag in SWITCHES:
                out.append(flag.replace("--", "--no-", 1))
            continue
        if re.fullmatch(r"-?\d+\.0+", value):
            value = value.split(".")[0]
        out += [flag, value]
    return out


if __name__ == "__main__":
    sys.exit(cli_main(to_cli(sys.argv[1:])))
